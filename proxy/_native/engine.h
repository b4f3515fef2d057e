/* The native data plane's engine: worker threads with one epoll each, owning
 * client sockets (and their TLS) and, while splicing, compute sockets. Python
 * (module.c) calls these functions without the GIL; they take a connection's
 * mutex briefly and never wait for I/O. Workers never touch Python objects:
 * they report session events into one queue plus an eventfd. */
#ifndef PGW_ENGINE_H
#define PGW_ENGINE_H

#include <stddef.h>
#include <stdint.h>

#include "tls_native.h"

/* A peer's queue past HIGH_WATER stops reading the side that feeds it until it
 * falls below LOW_WATER (proxy/splice.py's transport limits). */
#define PGW_HIGH_WATER (256 * 1024)
#define PGW_LOW_WATER (64 * 1024)
/* The per-thread read buffer: every chunk is read into it, never into memory
 * of the connection's own. */
#define PGW_READ_BUFFER (64 * 1024)
/* A queue Python may fill in PYTHON mode before write() refuses (it is told
 * to pause long before, at HIGH_WATER). */
#define PGW_MAX_PYTHON_QUEUE (16 * 1024 * 1024)
/* How long close() keeps trying to flush a peer that does not read (seconds). */
#define PGW_CLOSE_LINGER 5

enum {
    PGW_EV_READY = 1,
    PGW_EV_CLOSED = 2,
    PGW_EV_READABLE = 3,
    PGW_EV_DRAINED = 4,
    PGW_EV_YIELDED = 5,
    PGW_EV_COMPUTE_CLOSED = 6,
    PGW_EV_CLIENT_CLOSED = 7,
};

enum { PGW_MODE_HANDSHAKE = 0, PGW_MODE_PYTHON = 1, PGW_MODE_SPLICE = 2, PGW_MODE_CLOSING = 3 };

enum { PGW_YIELD_IDLE = 1, PGW_YIELD_BOUNDARY = 2, PGW_YIELD_NOW = 3 };

enum { PGW_MAY_PARK = 1, PGW_REWORD = 2 };

/* Return codes of the calls below. */
enum {
    PGW_OK = 0,
    PGW_ENOCONN = -1,   /* unknown or stale conn_id (ValueError) */
    PGW_EMODE = -2,     /* the call does not apply in the conn's mode (RuntimeError) */
    PGW_ENOMEM = -3,
    PGW_ESHUTDOWN = -4, /* the engine was shut down (RuntimeError) */
    PGW_ENOTLS = -5,    /* tls=True before set_certificates (RuntimeError) */
    PGW_ESYS = -6,      /* a system call failed: errno is set (OSError) */
    PGW_EFULL = -7,     /* write() past PGW_MAX_PYTHON_QUEUE (BufferError) */
};

typedef struct pgw_event {
    struct pgw_event *next;
    uint64_t conn_id;
    int kind;
    int cert_index; /* READY */
    int fd;         /* YIELDED */
    char *server_name; /* READY: malloc'd, or NULL */
    const char *alpn;  /* READY: static, or NULL */
    const char *records; /* READY: who does the TLS records ("tls1.3": the engine, "openssl"), or NULL */
    uint8_t *data;  /* YIELDED: malloc'd compute bytes, or NULL */
    size_t len;
    char reason[96];
} pgw_event;

typedef struct {
    int mode;
    int status;
    uint64_t ready_count;
    uint64_t requests;
    int unsynced, copying, fatal, front_broken, back_broken, terminated;
    int front_at_boundary, back_at_boundary, back_last_type;
    double last_client_activity;
    uint64_t bytes_from_client, bytes_from_compute;
    uint64_t client_queued;
    /* The client stream's place inside a message (a yield at a compute boundary
     * can find the client mid-message): body bytes still to come, and a partial
     * header. Python's tracker resumes from them. */
    uint32_t front_skip;
    uint8_t front_head_len;
    uint8_t front_head[4];
} pgw_state;

typedef struct pgw_engine pgw_engine;

pgw_engine *pgw_engine_new(int threads, char *err, size_t errlen);
int pgw_engine_fileno(pgw_engine *e);
/* Takes every queued event (a list, oldest first); the caller frees each one
 * with pgw_event_free. */
pgw_event *pgw_engine_events(pgw_engine *e);
void pgw_event_free(pgw_event *ev);
/* Swaps in a new certificate table (the engine takes the caller's reference). */
int pgw_engine_set_tls(pgw_engine *e, pgw_tls_table *t);
int pgw_engine_accept(pgw_engine *e, int fd, int tls, uint64_t *conn_id);
/* PYTHON mode: *data (malloc'd, *len bytes; NULL when nothing waits) or *eof. */
int pgw_engine_read(pgw_engine *e, uint64_t id, uint8_t **data, size_t *len, int *eof);
int pgw_engine_write(pgw_engine *e, uint64_t id, const uint8_t *data, size_t len,
                     size_t *queued);
int pgw_engine_pause(pgw_engine *e, uint64_t id, int paused);
int pgw_engine_splice(pgw_engine *e, uint64_t id, int compute_fd, const uint8_t *to_client,
                      size_t len, int flags, int status);
int pgw_engine_request_yield(pgw_engine *e, uint64_t id, int when);
int pgw_engine_state(pgw_engine *e, uint64_t id, pgw_state *out);
int pgw_engine_close(pgw_engine *e, uint64_t id, int abort);
/* Stops the threads and closes every connection; idempotent. */
void pgw_engine_shutdown(pgw_engine *e);
/* After shutdown: frees the engine (and closes its eventfd). */
void pgw_engine_free(pgw_engine *e);

#endif
