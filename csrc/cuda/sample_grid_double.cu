// sample_grid's CUDA launchers and kernels for double.
#include "cuda/sample_grid_launch.cuh"

GRAD_EXT_INSTANTIATE_SAMPLE_GRID(double)
