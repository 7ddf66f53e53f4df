// Torch side of the emulated build: the CUDA launchers of csrc/cuda, compiled against the
// emulator (guard.h's LORA_EXT_EMU branch: CPU tensors, no streams) and registered for the CPU
// key of the lora_ext_emu library, whose schemas tests/emu/harness.py copies from lora_ext.
#include "../merge_cuda.cpp"
#include "../multi_cuda.cpp"
#include "../lowrank_cuda.cpp"
#include "../register_cuda.cpp"
