// Transparent huge pages for fresh multi-MiB outputs: OFF by default, on
// with FLOCORA_HUGE_PAGES=1. Measured here (THP enabled=madvise,
// defrag=madvise, the common defaults; 4-bit decode into a fresh output,
// 2 threads; quiet machine; 2026-12-01):
//   single shot in a fresh process (one decode per FL round looks like this):
//     64 MiB: 70 ms advised, 12 ms not; 256 MiB: 284-299 ms advised, 44-46 not;
//   a loop of fresh outputs (each freed before the next):
//     64 MiB: median 3.6 ms advised, 16.8 not; 256 MiB: 12.9 advised, 69.7 not
//     (the first call as slow as a single shot).
// The single shot's cost is not compaction (/proc/vmstat's compact_stall
// stays 0, no fault falls back to small pages). This VM's balloon reports
// free blocks of 2 MiB and up to its host (free page reporting,
// page_reporting_order 9), which drops their backing; an advised fault takes
// such a block, and the host backs all of it again. Small pages come from
// lists below that order, whose memory stays backed, and a loop reuses its
// own huge pages before they are reported. Where memory stays backed the
// single shot need not pay this, but a process cannot tell which machine it
// is on, so the advice is opt-in. With defrag=madvise an advised fault that
// finds no free 2 MiB block compacts memory synchronously; the free-block
// count below skips the advice then.
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__linux__)
#include <stdio.h>
#include <sys/mman.h>
#endif

namespace flocora {
namespace cpu {

#if defined(__linux__) && defined(MADV_HUGEPAGE)
// Free blocks of 2 MiB and up, in 2 MiB units, over all zones; -1 if unknown.
inline int64_t free_2mib_blocks() {
  FILE* f = fopen("/proc/buddyinfo", "r");
  if (!f) return -1;
  char line[1024];
  int64_t blocks = 0;
  while (fgets(line, sizeof line, f)) {  // "Node 0, zone   Normal  n0 n1 ... n10"
    const char* p = strstr(line, "zone");
    if (!p) continue;
    p += 4;
    while (*p == ' ') ++p;
    while (*p && *p != ' ') ++p;  // the zone name
    char* end = nullptr;
    for (int order = 0;; ++order, p = end) {
      long long n = strtoll(p, &end, 10);
      if (end == p) break;
      if (order >= 9 && order < 40) blocks += (int64_t)n << (order - 9);
    }
  }
  fclose(f);
  return blocks;
}
#endif

inline bool huge_pages_wanted() {
  static const bool wanted = [] {
    const char* v = getenv("FLOCORA_HUGE_PAGES");
    return v != nullptr && strcmp(v, "1") == 0;
  }();
  return wanted;
}

inline void advise_huge_pages(void* ptr, size_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (!huge_pages_wanted()) return;
  constexpr uintptr_t kHuge = 2u << 20;
  if (nbytes < 2 * kHuge) return;
  uintptr_t begin = ((uintptr_t)ptr + kHuge - 1) & ~(kHuge - 1);
  uintptr_t end = ((uintptr_t)ptr + nbytes) & ~(kHuge - 1);
  if (end <= begin) return;
  if (free_2mib_blocks() < (int64_t)((end - begin) / kHuge)) return;  // would compact at fault time
  madvise((void*)begin, end - begin, MADV_HUGEPAGE);                  // advice only: errors are harmless
#else
  (void)ptr;
  (void)nbytes;
#endif
}

}  // namespace cpu
}  // namespace flocora
