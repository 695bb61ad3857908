// Precompiled header: the heavy torch include, compiled once per target.
#pragma once
#include <torch/torch.h>
