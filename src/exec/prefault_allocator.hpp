// A process-wide CPU allocator for torch that hands out large blocks already backed by memory.
//
// On a VM with shadow paging (like this one) the first touch of each 4 KiB page in a process is
// expensive: 0.2–0.5 s to first-write 136 MB, against ~10 ms for the same block in populated huge pages
// (exec::map_populated). Tools that allocate large tensors and fill them (the temporaries of
// extract and resize, merges on the generic path) spend much of their time there. Blocks of at least
// `min_bytes` come from map_populated (2 MiB multiples); freed, they are kept (up to 128 MB) for the next
// block of the same size, else unmapped. Smaller ones go to the allocator installed before.
// The CLI installs it at start-up (it replaces torch's CPU allocator for the whole process: call it before
// any tensor is created; calling it again does nothing).
#pragma once
#include <cstddef>

namespace lycoris::exec {

void use_prefault_allocator(size_t min_bytes = size_t{1} << 20);

}  // namespace lycoris::exec
