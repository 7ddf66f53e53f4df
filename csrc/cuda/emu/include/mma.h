// Emulated CUDA header (csrc/cuda/emu/emu.h): on the include path only in the emulated build.
#pragma once
#include "../emu.h"
