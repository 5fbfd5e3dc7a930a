"""Pure-PyTorch references: float64-capable, the CPU backend, the test oracle and the benchmarks' eager
baseline. They are written for clarity, not speed, and share no code with the kernels they check."""
