/*
 * pglf_chanmap.h - the router's channel map: channel name -> the targets
 * (subscription, channel index) listening on it.
 *
 * Internal to the C code (not in the cdef).  Thread role: owned by one
 * router, so used only on the Listener's selector thread; nothing here is
 * atomic or locked.
 *
 * A chained hash table (FNV-1a, power-of-two bucket count, grown when it
 * holds more entries than buckets).  Each entry keeps its targets in an
 * array in attach order, which is the fan-out order of routing; an entry
 * lives exactly as long as it has targets.  The map never dereferences a
 * pglf_sub: it only stores the pointer.
 */
#ifndef PGLF_CHANMAP_H
#define PGLF_CHANMAP_H

#include <stddef.h>
#include <stdint.h>

typedef struct pglf_sub pglf_sub;

/* One subscription channel served by an entry. */
typedef struct pglf_target {
    pglf_sub *sub;
    uint32_t idx;        /* channel index within `sub` */
    uint64_t last_seq;   /* sequence number of the last notification served */
} pglf_target;

typedef struct pglf_chanmap_entry {
    struct pglf_chanmap_entry *next;
    uint64_t hash;
    size_t len;
    pglf_target *targets;
    size_t ntargets, cap;
    char name[];         /* len bytes + NUL */
} pglf_chanmap_entry;

typedef struct pglf_chanmap {
    pglf_chanmap_entry **buckets;
    size_t nbuckets, nentries;
} pglf_chanmap;

/* Set up an empty map.  Returns PGLF_OK or PGLF_ENOMEM. */
int pglf_chanmap_init(pglf_chanmap *m);
/* Free every entry and the buckets (the subscriptions are left alone). */
void pglf_chanmap_destroy(pglf_chanmap *m);

/* The entry of channel `name` (len bytes), or NULL when nobody listens. */
pglf_chanmap_entry *pglf_chanmap_lookup(const pglf_chanmap *m, const char *name,
                                        size_t len);

/*
 * Append target (s, idx) to the entry of `name`, creating the entry when
 * needed, and store the entry in *out.  Returns PGLF_OK or PGLF_ENOMEM (the
 * map is then unchanged).  The caller makes sure (s, idx) is not attached
 * yet.
 */
int pglf_chanmap_attach(pglf_chanmap *m, const char *name, size_t len,
                        pglf_sub *s, uint32_t idx, pglf_chanmap_entry **out);

/*
 * Remove target (s, idx) from `e`, keeping the order of the other targets;
 * `e` is freed (and must not be used again) when it has no target left.
 */
void pglf_chanmap_detach(pglf_chanmap *m, pglf_chanmap_entry *e,
                         const pglf_sub *s, uint32_t idx);

#endif /* PGLF_CHANMAP_H */
