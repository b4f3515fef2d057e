/* Message-boundary trackers: the C twin of proxy/pgwire/tracker.py.
 *
 * The splice moves chunks without parsing them; the trackers are fed the same
 * chunks and read only the 5-byte headers (plus ReadyForQuery's status byte and
 * the first 7 bytes of an ErrorResponse body), skipping every body by its
 * length. A header split across chunks carries at most 4 bytes; an
 * ErrorResponse's severity split across chunks at most 6.
 *
 * Every read is bounded by the chunk's length, every length is checked
 * (< 4 is invalid, as in the Python tracker: the protocol's own minimum) and
 * lengths are added in 64 bits, so a length near 2^32 cannot wrap a position.
 *
 * The semantics are the Python tracker's, including its corners: a chunk that
 * ends in an invalid length leaves last_type as it was before that chunk (the
 * Python walk commits it after the loop), and an ErrorResponse's 7 severity
 * bytes are compared in place when the chunk holds them, even when its body is
 * shorter. tests/native/test_tracker.py checks the two agree after every chunk.
 *
 * Once broken, head[0] and head[1] keep the offending header's type and length
 * (head_len stays 0), so the Python binding can name them in its error. */
#include "tracker.h"

#include <string.h>

static inline uint32_t be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static int invalid(pgw_framer *f, uint8_t type, uint32_t length)
{
    f->broken = 1;
    f->skip = 0;
    f->want = 0;
    f->head_len = 0;
    f->head[0] = type;
    f->head[1] = (uint8_t)length; /* < 4 */
    return -1;
}

/* ---- backend (compute -> client) ---- */

static int severity_fatal(const uint8_t *p)
{
    return memcmp(p, "SFATAL", 7) == 0 || memcmp(p, "SPANIC", 7) == 0;
}

/* A header was read: type, body at data[body] (body <= n), body_length bytes. */
static inline void backend_message(pgw_backend *t, uint8_t type, const uint8_t *data, size_t n,
                                   size_t body, uint32_t body_length)
{
    switch (type) {
    case 'Z':
        /* Counted once its status is known, so the two always agree. */
        if (body < n || !body_length) {
            if (body_length)
                t->status = data[body];
            t->ready_count++;
            t->copying = 0;
        } else {
            t->f.want = 'Z';
        }
        break;
    case 'E':
        /* The severity is the first field: "SFATAL\0" or "SPANIC\0", 7 bytes. */
        if (n - body >= 7) {
            if (!t->fatal && severity_fatal(data + body))
                t->fatal = 1;
        } else if (body_length >= 7) {
            t->probe_len = (uint8_t)(n - body);
            memcpy(t->probe, data + body, n - body);
            t->f.want = 'E';
        }
        break;
    case 'G': /* CopyInResponse */
    case 'H': /* CopyOutResponse */
    case 'W': /* CopyBothResponse */
        t->copying = 1;
        break;
    default:
        break;
    }
}

/* The body of the message named by f.want starts at data[0]; n > 0. */
static inline void backend_body_start(pgw_backend *t, const uint8_t *data, size_t n)
{
    uint8_t want = t->f.want;
    t->f.want = 0;
    if (want == 'Z') {
        t->status = data[0];
        t->ready_count++;
        t->copying = 0;
    } else if (want == 'E') {
        size_t take = 7u - t->probe_len;
        if (take > n)
            take = n;
        memcpy(t->probe + t->probe_len, data, take);
        t->probe_len = (uint8_t)(t->probe_len + take);
        if (t->probe_len < 7) {
            t->f.want = 'E';
        } else {
            t->probe_len = 0;
            if (!t->fatal && severity_fatal(t->probe))
                t->fatal = 1;
        }
    }
}

/* ---- frontend (client -> compute) ---- */

static inline void frontend_message(pgw_frontend *t, uint8_t type, const uint8_t *data, size_t n,
                                    size_t body, uint32_t body_length)
{
    (void)data;
    (void)n;
    (void)body;
    (void)body_length;
    switch (type) {
    case 'Q': /* Query */
    case 'F': /* FunctionCall */
        t->requests++;
        break;
    case 'S': /* Sync */
        t->requests++;
        t->unsynced = 0;
        break;
    case 'P': /* Parse */
    case 'B': /* Bind */
    case 'E': /* Execute */
    case 'D': /* Describe */
    case 'C': /* Close */
    case 'H': /* Flush */
        t->unsynced = 1;
        break;
    case 'X': /* Terminate */
        t->terminated = 1;
        break;
    default:
        break;
    }
}

static inline void frontend_body_start(pgw_frontend *t, const uint8_t *data, size_t n)
{
    /* No frontend message asks to see its body. */
    (void)data;
    (void)n;
    t->f.want = 0;
}

/* ---- the walk, one copy per direction (the handlers inline) ---- */

typedef void (*message_fn)(void *t, uint8_t type, const uint8_t *data, size_t n, size_t body,
                           uint32_t body_length);
typedef void (*body_start_fn)(void *t, const uint8_t *data, size_t n);

/* Walks the headers of one chunk; `message` sees each header once, in order. */
static inline __attribute__((always_inline)) int
walk(pgw_framer *f, void *t, const uint8_t *data, size_t n, message_fn message,
     body_start_fn body_start)
{
    size_t pos = 0;
    if (f->skip || f->head_len || f->want || f->broken) {
        /* A chunk after one that ended inside a message: find its first header. */
        if (f->broken || !n)
            return 0;
        if (f->want)
            body_start(t, data, n);
        if (f->skip) {
            if (f->skip >= n) {
                f->skip -= (uint32_t)n;
                return 0;
            }
            pos = f->skip;
            f->skip = 0;
        } else if (f->head_len) {
            size_t carried = f->head_len, take = 5 - carried;
            uint8_t head[5];
            if (n < take) {
                memcpy(f->head + carried, data, n);
                f->head_len = (uint8_t)(carried + n);
                return 0;
            }
            memcpy(head, f->head, carried);
            memcpy(head + carried, data, take);
            f->head_len = 0;
            uint32_t length = be32(head + 1);
            if (length < 4)
                return invalid(f, head[0], length);
            f->last_type = head[0];
            message(t, head[0], data, n, take, length - 4);
            /* The next message starts at take + length - 4, maybe past this chunk. */
            if ((uint64_t)length - 4 > (uint64_t)(n - take)) {
                f->skip = (uint32_t)((uint64_t)length - 4 - (n - take));
                return 0;
            }
            pos = take + (length - 4);
        }
    }
    /* pos <= n from here on. last_type is committed after the walk, as in Python. */
    int last = -1;
    while (n - pos >= 5) {
        uint8_t type = data[pos];
        uint32_t length = be32(data + pos + 1);
        if (length < 4)
            return invalid(f, type, length);
        last = type;
        message(t, type, data, n, pos + 5, length - 4);
        if ((uint64_t)length + 1 > (uint64_t)(n - pos)) {
            f->skip = (uint32_t)((uint64_t)length + 1 - (n - pos));
            pos = n;
            break;
        }
        pos += (size_t)length + 1;
    }
    if (last >= 0)
        f->last_type = (uint8_t)last;
    if (pos < n) {
        f->head_len = (uint8_t)(n - pos);
        memcpy(f->head, data + pos, n - pos);
    }
    return 0;
}

static void backend_message_cb(void *t, uint8_t type, const uint8_t *data, size_t n, size_t body,
                               uint32_t body_length)
{
    backend_message(t, type, data, n, body, body_length);
}

static void backend_body_start_cb(void *t, const uint8_t *data, size_t n)
{
    backend_body_start(t, data, n);
}

static void frontend_message_cb(void *t, uint8_t type, const uint8_t *data, size_t n, size_t body,
                                uint32_t body_length)
{
    frontend_message(t, type, data, n, body, body_length);
}

static void frontend_body_start_cb(void *t, const uint8_t *data, size_t n)
{
    frontend_body_start(t, data, n);
}

int pgw_backend_feed(pgw_backend *t, const uint8_t *data, size_t n)
{
    return walk(&t->f, t, data, n, backend_message_cb, backend_body_start_cb);
}

int pgw_frontend_feed(pgw_frontend *t, const uint8_t *data, size_t n)
{
    return walk(&t->f, t, data, n, frontend_message_cb, frontend_body_start_cb);
}

void pgw_backend_init(pgw_backend *t)
{
    memset(t, 0, sizeof *t);
    t->status = 'I';
    /* A splice starts right after the login's ReadyForQuery. */
    t->f.last_type = 'Z';
}

void pgw_frontend_init(pgw_frontend *t)
{
    memset(t, 0, sizeof *t);
}

int pgw_at_boundary(const pgw_framer *f)
{
    return !f->skip && !f->head_len && !f->broken;
}

int pgw_backend_idle(const pgw_backend *t)
{
    return pgw_at_boundary(&t->f) && t->f.last_type == 'Z' && t->status == 'I';
}
