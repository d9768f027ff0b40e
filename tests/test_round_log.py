"""The one line the server logs per round names each hospital's epsilon and losses."""

from fedtwin.server.strategy import describe_round


def test_the_release_round_and_each_models_losses_are_described():
    release = {"round": 0, "hospitals": {"h0": {"epsilon": 5.19}}, "refused": []}
    assert describe_round(release) == "h0 eps 5.19 released its feature sums"
    gan = {"epsilon": 7.0, "steps": 35, "loss_d": 1.25, "loss_g": 0.5, "loss_anchor": 0.01}
    ddpm = {"epsilon": float("inf"), "steps": 3, "loss": 0.75}
    line = describe_round({"round": 1, "hospitals": {"h0": gan, "h1": ddpm},
                           "refused": [{"node": 7, "reason": "h2: at its budget"}]})  # fmt: skip
    assert line == (
        "h0 eps 7.00 loss_d 1.250 loss_g 0.500 loss_anchor 0.010; "
        "h1 eps inf (DP off) loss 0.750; node 7 refused: h2: at its budget"
    )
