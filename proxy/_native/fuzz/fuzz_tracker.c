/* libFuzzer harness for the message-boundary trackers (../tracker.c).
 *
 *   clang-14 -g -O1 -fsanitize=fuzzer,address,undefined -I.. fuzz_tracker.c ../tracker.c
 *   .venv/bin/python -m tests.native.test_fuzz seeds   # (from the repository root)
 *   ASAN_OPTIONS=quarantine_size_mb=16 ./a.out -max_total_time=600 seeds/tracker
 * tests/native/test_fuzz.py builds and runs it for 15 s in the test suite.
 *
 * Input: byte 0 gives k = byte0 % 16, bytes 1..k are chunk sizes (used in turn,
 * over and over; 0 feeds an empty chunk), the rest is the byte stream. The same
 * chunks go to a backend and a frontend tracker. After every chunk each
 * tracker's state is checked against a reference that re-reads the whole
 * stream so far message by message (a plain, chunk-free walk written here):
 * counters, status, flags, skip/head, the boundary, and -1 exactly from the
 * chunk that completed the first invalid header. The sanitizers check the
 * trackers never read or write outside the chunk or their own struct.
 *
 * The trackers' one chunking-dependent corner is allowed for: an ErrorResponse
 * body shorter than 7 bytes may read as FATAL when its chunk holds the next
 * bytes (as the Python tracker does), so `fatal` is checked between "must"
 * (a 7-byte-or-longer body starting SFATAL\0/SPANIC\0) and "may" (also the
 * 7 stream bytes after a shorter body). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tracker.h"

#define MAX_CHUNKS 4096

typedef struct {
    int broken;
    size_t broken_at;        /* where the invalid header ends */
    size_t pos;              /* the first byte not walked: a message start, or L when skipping */
    uint64_t skip;           /* body bytes past L still to come */
    size_t head_len;
    uint8_t last_type;
    uint8_t status;
    uint64_t ready_count;
    int copying, fatal_must, fatal_may;
    uint64_t requests;
    int unsynced, terminated;
} ref_state;

static void check(int ok, const char *what, size_t chunk)
{
    if (!ok) {
        fprintf(stderr, "fuzz_tracker: %s (after chunk %zu)\n", what, chunk);
        abort();
    }
}

static uint32_t be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static int severity_fatal(const uint8_t *p)
{
    return !memcmp(p, "SFATAL", 7) || !memcmp(p, "SPANIC", 7);
}

/* The reference: the whole stream s[0..L) walked message by message. */
static void reference(const uint8_t *s, size_t L, int backend, ref_state *r)
{
    memset(r, 0, sizeof *r);
    r->status = 'I';
    r->last_type = backend ? 'Z' : 0;
    size_t pos = 0;
    while (L - pos >= 5) {
        uint8_t type = s[pos];
        uint32_t length = be32(s + pos + 1);
        if (length < 4) {
            r->broken = 1;
            r->broken_at = pos + 5;
            break;
        }
        r->last_type = type;
        size_t body = pos + 5;
        uint64_t body_len = length - 4u;
        size_t have = L - body; /* body bytes within the stream so far */
        if (backend) {
            if (type == 'Z' && (body_len == 0 || have > 0)) {
                if (body_len)
                    r->status = s[body];
                r->ready_count++;
                r->copying = 0;
            } else if (type == 'E' && have >= 7 && severity_fatal(s + body)) {
                if (body_len >= 7)
                    r->fatal_must = 1;
                r->fatal_may = 1;
            } else if (type == 'G' || type == 'H' || type == 'W') {
                r->copying = 1;
            }
        } else {
            switch (type) {
            case 'Q': case 'F': r->requests++; break;
            case 'S': r->requests++; r->unsynced = 0; break;
            case 'P': case 'B': case 'E': case 'D': case 'C': case 'H': r->unsynced = 1; break;
            case 'X': r->terminated = 1; break;
            default: break;
            }
        }
        if (body_len > have) {
            r->skip = body_len - have;
            pos = L;
            r->pos = L;
            return;
        }
        pos = body + (size_t)body_len;
    }
    r->pos = pos;
    if (!r->broken)
        r->head_len = L - pos;
}

static void check_framer(const pgw_framer *f, const ref_state *r, const uint8_t *s, size_t chunk)
{
    check(f->broken == r->broken, "broken", chunk);
    if (r->broken)
        return;
    check(f->skip == r->skip, "skip", chunk);
    check(f->head_len == r->head_len, "head_len", chunk);
    check(f->head_len <= 4, "head_len <= 4", chunk);
    check(!memcmp(f->head, s + r->pos, f->head_len), "head bytes", chunk);
    check(f->last_type == r->last_type, "last_type", chunk);
    check(pgw_at_boundary(f) == (!r->skip && !r->head_len), "at_boundary", chunk);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    size_t k = data[0] % 16;
    if (size < 1 + k)
        return 0;
    const uint8_t *sizes = data + 1;
    const uint8_t *s = data + 1 + k;
    size_t n = size - 1 - k;

    pgw_backend back;
    pgw_frontend front;
    pgw_backend_init(&back);
    pgw_frontend_init(&front);
    int back_broken = 0, front_broken = 0;
    size_t pos = 0;
    for (size_t i = 0; pos < n || (i == 0 && n == 0); i++) {
        size_t len = (k && i < MAX_CHUNKS) ? sizes[i % k] : n - pos;
        if (len > n - pos)
            len = n - pos;
        /* Each chunk in its own allocation: ASan sees any read past its end. */
        uint8_t *chunk = malloc(len ? len : 1);
        check(chunk != NULL, "malloc", i);
        memcpy(chunk, s + pos, len);
        int rb = pgw_backend_feed(&back, chunk, len);
        int rf = pgw_frontend_feed(&front, chunk, len);
        free(chunk);
        pos += len;

        ref_state r;
        reference(s, pos, 1, &r);
        check(rb == ((r.broken && !back_broken) ? -1 : 0), "backend return value", i);
        back_broken = r.broken;
        check_framer(&back.f, &r, s, i);
        check(back.ready_count == r.ready_count, "ready_count", i);
        check(back.status == r.status, "status", i);
        check(back.copying == r.copying, "copying", i);
        check(back.fatal >= r.fatal_must && back.fatal <= r.fatal_may, "fatal", i);
        check(back.probe_len < 7, "probe_len", i);
        check(pgw_backend_idle(&back) ==
                  (pgw_at_boundary(&back.f) && back.f.last_type == 'Z' && back.status == 'I'),
              "idle", i);

        reference(s, pos, 0, &r);
        check(rf == ((r.broken && !front_broken) ? -1 : 0), "frontend return value", i);
        front_broken = r.broken;
        check_framer(&front.f, &r, s, i);
        check(front.requests == r.requests, "requests", i);
        check(front.unsynced == r.unsynced, "unsynced", i);
        check(front.terminated == r.terminated, "terminated", i);
        if (n == 0)
            break;
    }
    return 0;
}
