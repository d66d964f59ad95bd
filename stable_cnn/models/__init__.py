"""The networks: the SmallCNN, the BatchNorm over all processes, the weight average."""
