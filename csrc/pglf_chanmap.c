/*
 * pglf_chanmap.c - the router's channel map.  Single-threaded: see
 * pglf_chanmap.h.
 */
#include "pglf_chanmap.h"

#include <stdlib.h>
#include <string.h>

#include "pglf_ring.h"   /* PGLF_OK, PGLF_ENOMEM */

#define INITIAL_BUCKETS 64

static uint64_t hash_name(const char *s, size_t len)
{
    uint64_t h = 1469598103934665603ULL;     /* FNV-1a */
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ULL;
    }
    return h;
}

int pglf_chanmap_init(pglf_chanmap *m)
{
    m->nentries = 0;
    m->nbuckets = INITIAL_BUCKETS;
    m->buckets = calloc(m->nbuckets, sizeof(pglf_chanmap_entry *));
    return m->buckets ? PGLF_OK : PGLF_ENOMEM;
}

void pglf_chanmap_destroy(pglf_chanmap *m)
{
    if (m->buckets == NULL)
        return;
    for (size_t b = 0; b < m->nbuckets; b++) {
        pglf_chanmap_entry *e = m->buckets[b];
        while (e) {
            pglf_chanmap_entry *next = e->next;
            free(e->targets);
            free(e);
            e = next;
        }
    }
    free(m->buckets);
    m->buckets = NULL;
    m->nbuckets = m->nentries = 0;
}

static pglf_chanmap_entry *lookup(const pglf_chanmap *m, const char *name,
                                  size_t len, uint64_t h)
{
    for (pglf_chanmap_entry *e = m->buckets[h & (m->nbuckets - 1)]; e; e = e->next)
        if (e->hash == h && e->len == len && memcmp(e->name, name, len) == 0)
            return e;
    return NULL;
}

pglf_chanmap_entry *pglf_chanmap_lookup(const pglf_chanmap *m, const char *name,
                                        size_t len)
{
    return lookup(m, name, len, hash_name(name, len));
}

static int grow_buckets(pglf_chanmap *m)
{
    size_t nb = m->nbuckets * 2;
    pglf_chanmap_entry **b = calloc(nb, sizeof(pglf_chanmap_entry *));
    if (b == NULL)
        return PGLF_ENOMEM;
    for (size_t i = 0; i < m->nbuckets; i++) {
        pglf_chanmap_entry *e = m->buckets[i];
        while (e) {
            pglf_chanmap_entry *next = e->next;
            e->next = b[e->hash & (nb - 1)];
            b[e->hash & (nb - 1)] = e;
            e = next;
        }
    }
    free(m->buckets);
    m->buckets = b;
    m->nbuckets = nb;
    return PGLF_OK;
}

static void unlink_entry(pglf_chanmap *m, pglf_chanmap_entry *dead)
{
    pglf_chanmap_entry **pp = &m->buckets[dead->hash & (m->nbuckets - 1)];
    while (*pp != dead)
        pp = &(*pp)->next;
    *pp = dead->next;
    m->nentries--;
    free(dead->targets);
    free(dead);
}

int pglf_chanmap_attach(pglf_chanmap *m, const char *name, size_t len,
                        pglf_sub *s, uint32_t idx, pglf_chanmap_entry **out)
{
    uint64_t h = hash_name(name, len);
    pglf_chanmap_entry *e = lookup(m, name, len, h);
    if (e == NULL) {
        if (m->nentries + 1 > m->nbuckets && grow_buckets(m) != PGLF_OK)
            return PGLF_ENOMEM;
        e = calloc(1, sizeof(*e) + len + 1);
        if (e == NULL)
            return PGLF_ENOMEM;
        e->hash = h;
        e->len = len;
        memcpy(e->name, name, len);
        e->next = m->buckets[h & (m->nbuckets - 1)];
        m->buckets[h & (m->nbuckets - 1)] = e;
        m->nentries++;
    }
    if (e->ntargets == e->cap) {
        size_t cap = e->cap ? e->cap * 2 : 2;
        pglf_target *t = realloc(e->targets, cap * sizeof(pglf_target));
        if (t == NULL) {
            if (e->ntargets == 0)
                unlink_entry(m, e);
            return PGLF_ENOMEM;
        }
        e->targets = t;
        e->cap = cap;
    }
    e->targets[e->ntargets++] = (pglf_target){.sub = s, .idx = idx, .last_seq = 0};
    *out = e;
    return PGLF_OK;
}

void pglf_chanmap_detach(pglf_chanmap *m, pglf_chanmap_entry *e,
                         const pglf_sub *s, uint32_t idx)
{
    for (size_t k = 0; k < e->ntargets; k++) {
        if (e->targets[k].sub == s && e->targets[k].idx == idx) {
            /* Keep the order of the other targets (fan-out order). */
            memmove(&e->targets[k], &e->targets[k + 1],
                    (e->ntargets - k - 1) * sizeof(pglf_target));
            e->ntargets--;
            break;
        }
    }
    if (e->ntargets == 0)
        unlink_entry(m, e);
}
