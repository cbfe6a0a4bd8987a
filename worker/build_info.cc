#include "worker/build_info.h"

#include "torch/version.h"

namespace dmdserve {

std::string LibtorchVersion() { return TORCH_VERSION; }

}  // namespace dmdserve
