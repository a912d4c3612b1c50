#include <ATen/core/Tensor.h>
#include <torch/library.h>
