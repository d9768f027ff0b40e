"""Hospital side: the Flower ClientApp that runs a DP local round on the hospital's data."""
