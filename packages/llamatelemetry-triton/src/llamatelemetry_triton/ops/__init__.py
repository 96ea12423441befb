"""The built-in operations, one module each: reference, kernels, launcher, autograd, public function."""
