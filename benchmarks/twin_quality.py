"""Twin quality in the demo's setting, each part over independent `fedtwin demo` runs:
TSTR/TRTR on val, Fréchet distance, precision/recall/density/coverage, the audit's
verdict and wall time.

  (a) the demo's setting: 4 hospitals, Dirichlet alpha 0.5, epsilon 10, delta 1e-5
  (b) the same generator and plan trained centrally: one hospital holding all the data
  (i) the demo's setting at epsilon 1
  (k) the ladder that locates the loss of realism and utility: the generator without DP,
      central, trained three times as long (the capacity ceiling); the same at the
      default schedule; then with DP central (b) and with DP federated (a) beside it
  (m) MNIST, DPImageBench's yardstick: one hospital holding DPImageBench's 55,000 training
      images (as their split: the last 5,000 are val), at epsilon 10 and 1, on a longer
      schedule than the demo's (MNIST_SCHEDULE); a twin of MNIST_TWIN images and the
      accuracy of a classifier trained on it, on val
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import SETTING, repeated

# one hospital: there is no sum to hide an update in, so no secure aggregation
CENTRAL = ["federation.hospitals=1", "federation.secure_aggregation=false"]


def part_a(out_dir: Path, overrides: list[str], runs: int) -> dict:
    return repeated(out_dir / "a_federated", SETTING + overrides, runs)


def part_i(out_dir: Path, overrides: list[str], runs: int) -> dict:
    return repeated(out_dir / "i_epsilon_1", [*SETTING, *overrides, "privacy.epsilon=1"], runs)


def part_b(out_dir: Path, overrides: list[str], runs: int) -> dict:
    central = [*SETTING, *overrides, *CENTRAL]
    return {
        "note": "the same generator and privacy plan on the pooled training images of the "
        "4 hospitals' split (one hospital, same rounds x local steps, same epsilon)",
        **repeated(out_dir / "b_central", central, runs),
    }


# DPImageBench trains its DP generators for many epochs at large batches; on two CPU
# cores this is as far as one run in about half an hour goes: 1,000 DP steps of 256
# expected images (about 6 epochs of the 44,000 training images, after the holdout)
MNIST_SCHEDULE = [
    "federation.rounds=10",
    "federation.local_steps=100",
    "federation.batch_size=256",
]
MNIST_TWIN = 20000  # images (DPImageBench draws 60,000; the classifier is capped anyway)


def part_m(out_dir: Path, mnist: Path | None, overrides: list[str], runs: int) -> dict:
    """MNIST central at epsilon 10 and 1 (``--runs`` runs each)."""
    if mnist is None:
        raise ValueError("part m needs --mnist PATH: MNIST as a .npz with DPImageBench's "
                         "split (conf/data/mnist.yaml says which keys)")  # fmt: skip
    setting = [*SETTING, *overrides, *CENTRAL, "data=mnist", f"data.path={mnist}",
               *MNIST_SCHEDULE, f"twin.size={MNIST_TWIN}"]  # fmt: skip
    return {
        "note": "MNIST, one hospital (central), DPImageBench's split; accuracy of a "
        "classifier trained on the twin, on val (their table: on test)",
        "schedule": MNIST_SCHEDULE,
        "epsilon_10": repeated(out_dir / "m_mnist_eps10", [*setting, "privacy.epsilon=10"], runs),
        "epsilon_1": repeated(out_dir / "m_mnist_eps1", [*setting, "privacy.epsilon=1"], runs),
    }


def part_k(out_dir: Path, overrides: list[str], runs: int, cfg: dict) -> dict:
    """The ladder's first two rungs; (b) and (a) are the next two, run as their parts."""
    rounds = int(cfg["federation"]["rounds"])
    no_dp = [*SETTING, *overrides, *CENTRAL, "privacy.enabled=false"]
    return {
        "note": "rungs: no DP central, 3x the rounds (the capacity ceiling); no DP central, "
        "the default schedule; DP central is part (b), DP federated part (a)",
        "no_dp_central_long": repeated(
            out_dir / "k_no_dp_central_long", [*no_dp, f"federation.rounds={3 * rounds}"], runs
        ),
        "no_dp_central": repeated(out_dir / "k_no_dp_central", no_dp, runs),
    }
