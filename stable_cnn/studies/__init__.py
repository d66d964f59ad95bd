"""Studies of many runs: the sweep report, the ablation, the stability map."""
