// sample_grid's CUDA launchers and kernels for c10::Half.
#include "cuda/sample_grid_launch.cuh"

GRAD_EXT_INSTANTIATE_SAMPLE_GRID(c10::Half)
