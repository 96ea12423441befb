"""GPU-side optimizations: :mod:`~llamatelemetry.cuda.graphs`, :mod:`~llamatelemetry.cuda.triton_kernels`,
:mod:`~llamatelemetry.cuda.tensor_core`. Each is a separately installed component; nothing is imported here."""
