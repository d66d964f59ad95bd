"""The machine and the processes: hardware and precision, process groups, seeds, signals
and atomic files. Imports nothing of stable-cnn but its errors."""
