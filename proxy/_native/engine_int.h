/* The engine's internals, shared by engine.c (threads, connection table,
 * event queue), engine_api.c (the calls Python makes), engine_io.c (one
 * connection's I/O: TLS handshake, PYTHON-mode reading, closing) and
 * engine_splice.c (SPLICE mode: flow control, half-close, yields). */
#ifndef PGW_ENGINE_INT_H
#define PGW_ENGINE_INT_H

#include <pthread.h>
#include <stdatomic.h>

#include "engine.h"
#include "tls_records.h"
#include "tracker.h"

/* A byte queue, allocated only while it holds bytes: data[off, off + len). */
typedef struct {
    uint8_t *data;
    uint32_t off, len, cap;
} pgw_buf;

/* Why a side stopped: an errno (> 0), or one of these. */
enum { PGW_WHY_EOF = -1, PGW_WHY_TLS = -2, PGW_WHY_NOMEM = -3 };

typedef struct pgw_worker pgw_worker;

struct pgw_engine {
    int nthreads;
    pgw_worker *workers;
    atomic_uint next_worker;
    int evfd;
    pthread_mutex_t ev_mu;
    pgw_event *ev_head, *ev_tail;
    pthread_mutex_t table_mu;
    struct pgw_conn **slots;
    uint32_t *gens;
    uint32_t nslots;
    uint32_t *free_slots;
    uint32_t n_free;
    pgw_tls_table *tls; /* under table_mu */
    int shut;           /* under table_mu */
};

typedef struct pgw_conn {
    pthread_mutex_t mu;
    uint64_t id;
    pgw_worker *w;
    /* Worker-owned links (only its thread touches them), and the kick list's
     * (under the worker's kick_mu, like `kicked`). */
    struct pgw_conn *kick_next, *run_next, *free_next, *linger_prev, *linger_next;
    int cfd, pfd;                /* client, compute (-1: none) */
    SSL *ssl;                    /* OpenSSL's records (the handshake, TLS 1.2) */
    pgw_tls13 *t13;              /* TLS 1.3 records after the handshake; neither: plaintext */
    pgw_buf rin;                 /* t13: the start of a record not all here yet */
    pgw_buf tout;                /* t13: sealed records the socket has not taken */
    const char *tls_why;         /* t13: why the client's TLS failed */
    pgw_tls_table *table;        /* held during the handshake only */
    pgw_tls_choice choice;       /* the SNI decision, until READY */
    pgw_buf in;                  /* PYTHON mode: client bytes Python has not read */
    pgw_buf to_client, to_compute;
    pgw_frontend front;
    pgw_backend back;
    uint64_t bytes_from_client, bytes_from_compute;
    double last_activity;
    double linger_deadline;
    int cwhy, pwhy;              /* why the client / compute side failed */
    uint32_t ssl_err;            /* the OpenSSL error code when cwhy is PGW_WHY_TLS */
    uint8_t mode, yield_when, splice_flags;
    uint8_t kicked;              /* under the worker's kick_mu, hence its own byte */
    /* Under `mu`. Readiness as epoll last reported it (edge-triggered: cleared
     * only when a call says it would block). */
    unsigned cr_ready : 1, cw_ready : 1, pr_ready : 1, pw_ready : 1;
    /* epoll reported the peer's FIN (or an error): a short read may have left
     * it unread, and no new edge will come for it. */
    unsigned c_hup : 1, p_hup : 1;
    /* TLS: OpenSSL's last read of the client socket got less than it asked
     * for (it drained the socket); cleared by every client event. */
    unsigned bio_drained : 1;
    unsigned client_eof : 1, client_dead : 1, compute_shut : 1;
    unsigned paused : 1, readable_sent : 1, want_drained : 1;
    unsigned cblock : 1, pblock : 1, client_hold : 1;
    unsigned close_req : 1, abort_req : 1, lingering : 1, dead : 1;
} pgw_conn;


struct pgw_worker {
    pgw_engine *e;
    pthread_t thread;
    int started;
    int epfd, kickfd;
    pthread_mutex_t kick_mu;
    pgw_conn *kicks;
    atomic_int stop;
    pgw_conn *lingering; /* closing conns still flushing, with a deadline */
    pgw_conn *retired;   /* freed at the end of the loop iteration */
    uint8_t *buf;        /* the per-thread read buffer */
};

/* A TLS client, whichever code does its records: it has no half-close. */
static inline int pgw_client_tls(const pgw_conn *c) { return c->ssl || c->t13; }

/* engine.c */
int pgw_table_insert(pgw_engine *e, pgw_conn *c);
void pgw_table_remove(pgw_engine *e, pgw_conn *c);
/* The live conn `id`, locked; NULL when unknown, stale or dead. */
pgw_conn *pgw_lock_conn(pgw_engine *e, uint64_t id);
void pgw_conn_free(pgw_conn *c);
void pgw_emit(pgw_engine *e, pgw_event *ev);
pgw_event *pgw_event_new(const pgw_conn *c, int kind);
/* Queue `c` for its worker's attention; `wake`: from another thread. */
void pgw_kick(pgw_conn *c, int wake);
pgw_engine *pgw_worker_engine(pgw_worker *w);
double pgw_now(void);

/* engine_io.c */
int pgw_buf_append(pgw_buf *b, const uint8_t *p, size_t n);
void pgw_buf_consume(pgw_buf *b, size_t n);
void pgw_buf_free(pgw_buf *b);
/* Everything the conn can do now (worker thread, under c->mu). */
void pgw_progress(pgw_worker *w, pgw_conn *c);
/* Send queued client bytes (any thread, under c->mu). 1 if bytes moved. */
int pgw_flush_client(pgw_engine *e, pgw_conn *c);
/* Closes the conn's sockets and frees its buffers (under c->mu, or at shutdown). */
void pgw_release(pgw_conn *c, int epfd);
void pgw_reason(const pgw_conn *c, int why, char *out, size_t outlen);
/* Lets client reads see when OpenSSL's reads drained the client socket. */
void pgw_watch_reads(pgw_conn *c);
void pgw_emit_reason(pgw_engine *e, pgw_conn *c, int kind, int why, const char *text);
/* Read into `buf` (up to `cap`) what the client / compute has; flags say why not more. */
size_t pgw_client_recv(pgw_conn *c, uint8_t *buf, size_t cap);
size_t pgw_compute_recv(pgw_conn *c, uint8_t *buf, size_t cap);
size_t pgw_compute_send(pgw_conn *c, const uint8_t *p, size_t n);
/* Send now when nothing is queued before; queue the rest (bounded by the callers). */
void pgw_send_client(pgw_conn *c, const uint8_t *p, size_t n);
void pgw_send_compute(pgw_conn *c, const uint8_t *p, size_t n);
void pgw_drop_compute(pgw_conn *c, int epfd);

/* engine_splice.c: one round of SPLICE mode; 1 if anything moved or changed. */
int pgw_splice_step(pgw_worker *w, pgw_conn *c);

#endif
