/* A cache of large malloc blocks, loaded with LD_PRELOAD by the jobs
 * (experiments/runtime.py).
 *
 * XLA:CPU takes each call's temporary buffer from malloc (284 MB per device
 * for the seed U-Net's train step at batch 128 on two devices). glibc serves
 * every block of 32 MiB or more with a fresh mmap and unmaps it on free, so
 * each call faults all its pages in again and the kernel zeroes them: 91-304
 * ms of system time per train step on a 2-core VM. This library keeps such
 * blocks mapped after free() and hands them out again to the next request of
 * the same size class (a freed block of s bytes serves requests of s/2 to s).
 *
 * Only requests of ALLOC_CACHE_MIN bytes or more, with an alignment up to 2
 * MiB, are served here; everything else goes to glibc unchanged
 * (__libc_malloc and friends). Blocks are 2 MiB-aligned mmaps advised for
 * transparent huge pages. At most DDPM_JAX_ALLOC_CACHE_MB MiB (default 2048)
 * of freed blocks are kept; a free beyond that unmaps the block.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

extern void *__libc_malloc(size_t);
extern void __libc_free(void *);
extern void *__libc_memalign(size_t, size_t);
extern void *__libc_realloc(void *, size_t);

#define ALLOC_CACHE_MIN ((size_t)32 << 20)
#define PAGE ((size_t)2 << 20)
#define SLOTS 64

typedef struct {
  void *p;
  size_t size;
  int used;
} slot_t;

static slot_t slots[SLOTS];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static int enabled = 1;
static size_t cap_bytes = (size_t)-1; /* read from the environment at first use */
static size_t free_bytes;             /* bytes of freed blocks kept mapped */
static unsigned long n_maps, n_hits, n_unmaps;
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void lock(void) { pthread_mutex_lock(&mu); }
static void unlock(void) { pthread_mutex_unlock(&mu); }

static void init(void) {
  const char *s = getenv("DDPM_JAX_ALLOC_CACHE_MB");
  long mb = s ? strtol(s, NULL, 10) : 2048;
  cap_bytes = (size_t)(mb < 0 ? 0 : mb) << 20;
  /* A fork while another thread holds the lock would leave it held in the child. */
  pthread_atfork(lock, unlock, unlock);
}

/* For tests and A/B runs: turn serving new blocks on or off (frees of blocks
 * already served still come here), and read the counters. */
void ddpm_alloc_cache_enable(int on) { enabled = on; }

void ddpm_alloc_cache_stats(unsigned long *maps, unsigned long *hits, unsigned long *unmaps,
                            size_t *kept) {
  lock();
  *maps = n_maps;
  *hits = n_hits;
  *unmaps = n_unmaps;
  *kept = free_bytes;
  unlock();
}

static void *map_block(size_t size) {
  char *p = mmap(NULL, size + PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return NULL;
  char *a = (char *)(((uintptr_t)p + PAGE - 1) & ~(uintptr_t)(PAGE - 1));
  if (a > p) munmap(p, (size_t)(a - p));
  if (p + size + PAGE > a + size) munmap(a + size, (size_t)(p + size + PAGE - (a + size)));
  madvise(a, size, MADV_HUGEPAGE);
  return a;
}

/* A block of at least n bytes, or NULL (then glibc serves the request). */
static void *cache_alloc(size_t n) {
  if (!enabled || n < ALLOC_CACHE_MIN || n > ((size_t)1 << 46)) return NULL;
  pthread_once(&once, init);
  size_t size = (n + PAGE - 1) / PAGE * PAGE;
  lock();
  int best = -1, empty = -1;
  for (int i = 0; i < SLOTS; i++) {
    if (!slots[i].p) {
      if (empty < 0) empty = i;
    } else if (!slots[i].used && slots[i].size >= size && slots[i].size <= 2 * size &&
               (best < 0 || slots[i].size < slots[best].size)) {
      best = i;
    }
  }
  if (best >= 0) {
    slots[best].used = 1;
    free_bytes -= slots[best].size;
    n_hits++;
    unlock();
    return slots[best].p;
  }
  if (empty < 0) { /* every slot holds a block: unmap a free one, if any */
    for (int i = 0; i < SLOTS && empty < 0; i++) {
      if (!slots[i].used) {
        munmap(slots[i].p, slots[i].size);
        free_bytes -= slots[i].size;
        slots[i].p = NULL;
        n_unmaps++;
        empty = i;
      }
    }
  }
  void *p = empty < 0 ? NULL : map_block(size);
  if (p) {
    slots[empty].p = p;
    slots[empty].size = size;
    slots[empty].used = 1;
    n_maps++;
  }
  unlock();
  return p;
}

/* Whether p may be a block of ours. Blocks here are 2 MiB-aligned; glibc's
 * are not (its chunks start 16 bytes into a page), so most frees skip the lock. */
static int maybe_ours(void *p) { return p && !((uintptr_t)p & (PAGE - 1)); }

/* The slot holding p, or -1; under the lock. */
static int find(void *p) {
  for (int i = 0; i < SLOTS; i++)
    if (slots[i].p == p) return i;
  return -1;
}

static int cache_free(void *p) {
  if (!maybe_ours(p)) return 0;
  lock();
  int i = find(p);
  if (i >= 0) {
    if (free_bytes + slots[i].size > cap_bytes) {
      munmap(p, slots[i].size);
      slots[i].p = NULL;
      n_unmaps++;
    } else {
      slots[i].used = 0;
      free_bytes += slots[i].size;
    }
  }
  unlock();
  return i >= 0;
}

static size_t cache_size(void *p) {
  if (!maybe_ours(p)) return 0;
  lock();
  int i = find(p);
  size_t s = i >= 0 ? slots[i].size : 0;
  unlock();
  return s;
}

void *malloc(size_t n) {
  void *p = cache_alloc(n);
  return p ? p : __libc_malloc(n);
}

void free(void *p) {
  if (!cache_free(p)) __libc_free(p);
}

void *aligned_alloc(size_t alignment, size_t n) {
  void *p = alignment <= PAGE ? cache_alloc(n) : NULL;
  return p ? p : __libc_memalign(alignment, n);
}

void *memalign(size_t alignment, size_t n) { return aligned_alloc(alignment, n); }

int posix_memalign(void **out, size_t alignment, size_t n) {
  if (alignment < sizeof(void *) || (alignment & (alignment - 1))) return EINVAL;
  void *p = aligned_alloc(alignment, n);
  if (!p) return ENOMEM;
  *out = p;
  return 0;
}

void *realloc(void *p, size_t n) {
  size_t have = cache_size(p);
  if (!have) return __libc_realloc(p, n);
  if (n == 0) {
    free(p);
    return NULL;
  }
  if (n <= have && n >= have / 2) return p;
  void *q = malloc(n);
  if (q) {
    memcpy(q, p, n < have ? n : have);
    free(p);
  }
  return q;
}

size_t malloc_usable_size(void *p) {
  size_t have = cache_size(p);
  if (have) return have;
  static size_t (*next)(void *);
  if (!next) next = (size_t(*)(void *))dlsym(RTLD_NEXT, "malloc_usable_size");
  return next ? next(p) : 0;
}
