// Fresh multi-MiB outputs cost more in page faults than a whole fused pass
// over them (about 20 ms per 64 MiB of 4 KiB pages here). Asking for
// transparent huge pages before the first touch cuts that several-fold where
// the kernel allows it (THP "madvise" mode, the common default); elsewhere
// it is a no-op. PyTorch does the same for all CPU allocations when
// THP_MEM_ALLOC_ENABLE=1.
#pragma once
#include <stddef.h>
#include <stdint.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace flocora {
namespace cpu {

inline void advise_huge_pages(void* ptr, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = 2u << 20;
  if (nbytes < 2 * kHuge) return;
  uintptr_t begin = ((uintptr_t)ptr + kHuge - 1) & ~(kHuge - 1);
  uintptr_t end = ((uintptr_t)ptr + nbytes) & ~(kHuge - 1);
  if (end > begin) madvise((void*)begin, end - begin, MADV_HUGEPAGE);  // advice only: errors are harmless
#else
  (void)ptr;
  (void)nbytes;
#endif
}

}  // namespace cpu
}  // namespace flocora
