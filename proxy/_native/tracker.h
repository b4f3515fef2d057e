/* Message-boundary trackers for the spliced byte streams: the C twin of
 * proxy/pgwire/tracker.py, with the same semantics exactly (the differential
 * tests in tests/native/test_tracker.py feed both the same chunks).
 * Sans-IO: fed the chunks the splice moves; reads only headers, ReadyForQuery's
 * status byte and an ErrorResponse's first 7 body bytes. No allocation. */
#ifndef PGW_TRACKER_H
#define PGW_TRACKER_H

#include <stddef.h>
#include <stdint.h>

typedef struct {
    uint32_t skip;          /* body bytes of the current message still to come */
    uint8_t head[4];        /* a partial header (0..4 bytes) carried to the next chunk */
    uint8_t head_len;
    uint8_t want;           /* a message type whose body starts at the next chunk's first byte */
    uint8_t last_type;      /* type of the last message whose header was read */
    uint8_t broken;         /* an invalid length was seen: input is ignored from then on */
} pgw_framer;

typedef struct {
    pgw_framer f;
    uint8_t status;         /* last ReadyForQuery status: 'I', 'T' or 'E' (starts 'I') */
    uint8_t copying;        /* between Copy{In,Out,Both}Response and the next ReadyForQuery */
    uint8_t fatal;          /* an ErrorResponse with severity FATAL or PANIC was seen */
    uint8_t probe_len;
    uint8_t probe[7];       /* first bytes of an ErrorResponse body split across chunks */
    uint64_t ready_count;   /* ReadyForQuery messages seen */
} pgw_backend;             /* compute -> client; last_type starts as 'Z' */

typedef struct {
    pgw_framer f;
    uint8_t unsynced;       /* Parse/Bind/Execute/Describe/Close/Flush since the last Sync */
    uint8_t terminated;     /* Terminate ('X') seen */
    uint64_t requests;      /* Query, Sync, FunctionCall: each earns one ReadyForQuery */
} pgw_frontend;            /* client -> compute */

void pgw_backend_init(pgw_backend *t);
void pgw_frontend_init(pgw_frontend *t);
/* Account for one chunk. 0, or -1 on an invalid length (< 4): the tracker is then
 * broken and ignores all further input (as the Python one does). Never reads past
 * data[n-1]; no allocation. */
int pgw_backend_feed(pgw_backend *t, const uint8_t *data, size_t n);
int pgw_frontend_feed(pgw_frontend *t, const uint8_t *data, size_t n);
int pgw_at_boundary(const pgw_framer *f);        /* !skip && !head_len && !broken */
int pgw_backend_idle(const pgw_backend *t);      /* at boundary, last_type 'Z', status 'I' */

#endif
