/* SPLICE mode (engine_int.h): each direction reads a chunk into the worker's
 * buffer, feeds its tracker and writes it on; a peer's queue past HIGH_WATER
 * stops the side that feeds it. Yields hand the compute back to Python; the
 * compute or the client going ends the splice. Under the conn's mutex. */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>

#include "engine_int.h"

static int outstanding(const pgw_conn *c) {
    return c->front.requests > c->back.ready_count || c->front.unsynced;
}

/* proxy/splice.py's Splice.idle: idle outside a transaction, nothing asked. */
static int splice_idle(const pgw_conn *c) {
    return pgw_backend_idle(&c->back) && !outstanding(c);
}

/* SPLICE -> PYTHON: the compute fd goes back to Python with `held` (compute
 * bytes not forwarded). Client bytes not yet written to the compute become
 * readable by Python again, ahead of anything the client sends next. */
static void do_yield(pgw_worker *w, pgw_conn *c, const char *reason, const uint8_t *held,
                     size_t held_len) {
    pgw_event *ev = pgw_event_new(c, PGW_EV_YIELDED);
    if (ev && held_len) {
        ev->data = malloc(held_len);
        if (ev->data) {
            memcpy(ev->data, held, held_len);
            ev->len = held_len;
        } else {
            free(ev);
            ev = NULL;
        }
    }
    if (!ev) { /* cannot hand the compute back: end the splice as if it went */
        pgw_drop_compute(c, w->epfd);
        c->mode = PGW_MODE_PYTHON;
        c->paused = 1;
        c->yield_when = 0;
        pgw_emit_reason(pgw_worker_engine(w), c, PGW_EV_COMPUTE_CLOSED, PGW_WHY_NOMEM, NULL);
        return;
    }
    epoll_ctl(w->epfd, EPOLL_CTL_DEL, c->pfd, NULL);
    ev->fd = c->pfd;
    c->pfd = -1;
    pgw_buf_free(&c->in);
    c->in = c->to_compute;
    memset(&c->to_compute, 0, sizeof c->to_compute);
    c->mode = PGW_MODE_PYTHON;
    c->paused = 1;
    c->yield_when = 0;
    c->client_hold = c->cblock = c->pblock = 0;
    c->readable_sent = 0;
    c->compute_shut = 0;
    snprintf(ev->reason, sizeof ev->reason, "%s", reason);
    pgw_emit(pgw_worker_engine(w), ev);
}

/* The compute closed or failed: the conn goes back to Python, reading paused. */
static void compute_gone(pgw_worker *w, pgw_conn *c) {
    int why = c->pwhy ? c->pwhy : PGW_WHY_EOF;
    pgw_drop_compute(c, w->epfd);
    c->mode = PGW_MODE_PYTHON;
    c->paused = 1;
    c->yield_when = 0;
    c->client_hold = c->cblock = c->pblock = 0;
    c->readable_sent = 0;
    pgw_emit_reason(pgw_worker_engine(w), c, PGW_EV_COMPUTE_CLOSED, why, NULL);
}

/* The client closed or failed: the compute gets what is queued for it (one
 * try) and is closed; Python reads the final state, then closes. */
static void client_gone(pgw_worker *w, pgw_conn *c) {
    int why = c->cwhy ? c->cwhy : PGW_WHY_EOF;
    if (c->to_compute.len && !c->pwhy)
        pgw_compute_send(c, c->to_compute.data + c->to_compute.off, c->to_compute.len);
    pgw_drop_compute(c, w->epfd);
    /* A clean close_notify still gets ours at close(); a failed client nothing. */
    if (why != PGW_WHY_EOF)
        c->client_dead = 1;
    pgw_buf_free(&c->to_client);
    c->mode = PGW_MODE_PYTHON;
    c->paused = 1;
    c->yield_when = 0;
    c->readable_sent = 1; /* Python knows: no READABLE for this */
    pgw_emit_reason(pgw_worker_engine(w), c, PGW_EV_CLIENT_CLOSED, why, NULL);
}

/* A yield asked for: 1 once it happened. */
static int check_yield(pgw_worker *w, pgw_conn *c) {
    switch (c->yield_when) {
    case PGW_YIELD_NOW:
        do_yield(w, c, "now", NULL, 0);
        return 1;
    case PGW_YIELD_BOUNDARY:
        c->client_hold = 1;
        if (pgw_at_boundary(&c->back.f)) {
            do_yield(w, c, "boundary", NULL, 0);
            return 1;
        }
        return 0;
    case PGW_YIELD_IDLE:
        if (!c->to_compute.len && splice_idle(c) && pgw_at_boundary(&c->front.f)) {
            do_yield(w, c, "idle", NULL, 0);
            return 1;
        }
        return 0;
    }
    return 0;
}

int pgw_splice_step(pgw_worker *w, pgw_conn *c) {
    int did = 0;
    if (c->client_dead || (c->client_eof && pgw_client_tls(c))) {
        /* TLS has no half-close: close_notify or EOF ends both directions. */
        client_gone(w, c);
        return 1;
    }
    if (c->pwhy) {
        compute_gone(w, c);
        return 1;
    }
    if (check_yield(w, c))
        return 1;
    /* compute -> client */
    if (c->pr_ready && !c->pblock) {
        size_t n = pgw_compute_recv(c, w->buf, PGW_READ_BUFFER);
        if (n) {
            did = 1;
            const uint8_t *p = w->buf;
            if (p[0] == 'E' && (c->splice_flags & PGW_MAY_PARK) &&
                pgw_at_boundary(&c->back.f) &&
                ((c->splice_flags & PGW_REWORD) || splice_idle(c))) {
                /* A backend says FATAL just before it goes: Python decides
                 * whether the client ever sees it (a park) or in which words. */
                do_yield(w, c, "error", p, n);
                return 1;
            }
            c->bytes_from_compute += n;
            pgw_backend_feed(&c->back, p, n);
            pgw_send_client(c, p, n);
            if (c->to_client.len >= PGW_HIGH_WATER)
                c->pblock = 1;
            if (c->client_dead) {
                client_gone(w, c);
                return 1;
            }
            if (c->yield_when == PGW_YIELD_IDLE && check_yield(w, c))
                return 1;
        } else if (c->pwhy) {
            compute_gone(w, c);
            return 1;
        }
    }
    /* client -> compute */
    if (c->cr_ready && !c->client_eof && !c->cblock && !c->client_hold) {
        size_t n = pgw_client_recv(c, w->buf, PGW_READ_BUFFER);
        if (n) {
            did = 1;
            c->bytes_from_client += n;
            c->last_activity = pgw_now();
            pgw_frontend_feed(&c->front, w->buf, n);
            pgw_send_compute(c, w->buf, n);
            if (c->to_compute.len >= PGW_HIGH_WATER)
                c->cblock = 1;
            if (c->pwhy) {
                compute_gone(w, c);
                return 1;
            }
        }
        if (c->client_dead || (c->client_eof && pgw_client_tls(c))) {
            client_gone(w, c);
            return 1;
        }
        if (c->client_eof)
            did = 1;
    }
    /* A plaintext client's EOF goes on to the compute once its bytes are there;
     * the compute is read to its end. */
    if (c->client_eof && !c->compute_shut && !c->to_compute.len) {
        shutdown(c->pfd, SHUT_WR);
        c->compute_shut = 1;
    }
    return did;
}
