/* The calls Python makes (engine.h): each takes the conn's mutex briefly,
 * never waits for I/O, and leaves the I/O to the conn's worker (a kick) except
 * write(), which sends from the caller's thread when the socket takes it. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "engine_int.h"

int pgw_engine_set_tls(pgw_engine *e, pgw_tls_table *t) {
    pthread_mutex_lock(&e->table_mu);
    if (e->shut) {
        pthread_mutex_unlock(&e->table_mu);
        pgw_tls_table_unref(t);
        return PGW_ESHUTDOWN;
    }
    pgw_tls_table *old = e->tls;
    e->tls = t;
    pthread_mutex_unlock(&e->table_mu);
    pgw_tls_table_unref(old); /* handshakes in progress hold their own reference */
    return PGW_OK;
}

static void socket_options(int fd) {
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0 && !(flags & O_NONBLOCK))
        fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    int one = 1;
    /* Fails harmlessly on a Unix socket. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

int pgw_engine_accept(pgw_engine *e, int fd, int tls, uint64_t *conn_id) {
    pgw_conn *c = calloc(1, sizeof *c);
    if (!c)
        return PGW_ENOMEM;
    pthread_mutex_init(&c->mu, NULL);
    c->cfd = fd;
    c->pfd = -1;
    c->choice.cert_index = -1;
    pgw_backend_init(&c->back);
    pgw_frontend_init(&c->front);
    c->cr_ready = c->cw_ready = 1;
    c->mode = tls ? PGW_MODE_HANDSHAKE : PGW_MODE_PYTHON;
    c->w = &e->workers[atomic_fetch_add(&e->next_worker, 1) % (unsigned)e->nthreads];
    /* Held from before it is visible until it is set up: a call that finds it
     * meanwhile waits. */
    pthread_mutex_lock(&e->table_mu);
    pthread_mutex_lock(&c->mu);
    int rc = e->shut ? PGW_ESHUTDOWN : PGW_OK;
    if (!rc && tls && !e->tls)
        rc = PGW_ENOTLS;
    if (!rc && tls) {
        c->table = e->tls;
        pgw_tls_table_ref(c->table);
    }
    if (!rc && pgw_table_insert(e, c) < 0)
        rc = PGW_ENOMEM;
    pthread_mutex_unlock(&e->table_mu);
    if (rc) {
        pthread_mutex_unlock(&c->mu);
        pgw_tls_table_unref(c->table);
        pgw_conn_free(c);
        return rc;
    }
    socket_options(fd);
    if (tls && !(c->ssl = pgw_tls_new_ssl(c->table, fd, &c->choice)))
        rc = PGW_ENOMEM;
    if (c->ssl)
        pgw_watch_reads(c);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = c};
    if (!rc && epoll_ctl(c->w->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        rc = PGW_ESYS;
    if (rc) {
        int saved = errno;
        c->cfd = -1; /* the caller keeps the socket */
        pgw_release(c, -1);
        c->dead = 1;
        pthread_mutex_unlock(&c->mu);
        pthread_mutex_lock(&e->table_mu);
        pgw_table_remove(e, c);
        pthread_mutex_unlock(&e->table_mu);
        pthread_mutex_lock(&c->mu);
        pthread_mutex_unlock(&c->mu);
        pgw_conn_free(c);
        errno = saved;
        return rc;
    }
    if (!tls) {
        pgw_event *ready = pgw_event_new(c, PGW_EV_READY);
        if (ready)
            ready->cert_index = -1;
        pgw_emit(e, ready);
    }
    *conn_id = c->id;
    pthread_mutex_unlock(&c->mu);
    return PGW_OK;
}

int pgw_engine_read(pgw_engine *e, uint64_t id, uint8_t **data, size_t *len, int *eof) {
    pgw_conn *c = pgw_lock_conn(e, id);
    if (!c)
        return PGW_ENOCONN;
    *data = NULL;
    *len = 0;
    *eof = 0;
    if (c->mode != PGW_MODE_PYTHON) {
        pthread_mutex_unlock(&c->mu);
        return PGW_EMODE;
    }
    int ended = c->client_eof || c->client_dead;
    if (c->in.len) {
        int was_full = c->in.len >= PGW_HIGH_WATER;
        if (c->in.off)
            memmove(c->in.data, c->in.data + c->in.off, c->in.len);
        *data = c->in.data;
        *len = c->in.len;
        memset(&c->in, 0, sizeof c->in);
        /* The end comes as one more READABLE, for a read that returns None. */
        c->readable_sent = ended;
        if (ended)
            pgw_emit(e, pgw_event_new(c, PGW_EV_READABLE));
        else if (was_full && !c->paused)
            pgw_kick(c, 1);
    } else if (ended) {
        *eof = 1;
    } else {
        c->readable_sent = 0;
    }
    pthread_mutex_unlock(&c->mu);
    return PGW_OK;
}

int pgw_engine_write(pgw_engine *e, uint64_t id, const uint8_t *data, size_t len,
                     size_t *queued) {
    pgw_conn *c = pgw_lock_conn(e, id);
    if (!c)
        return PGW_ENOCONN;
    int rc = PGW_OK;
    *queued = 0;
    if (c->mode != PGW_MODE_PYTHON && c->mode != PGW_MODE_HANDSHAKE) {
        rc = PGW_EMODE;
    } else if (c->client_dead) {
        /* Like a closed transport: the bytes have nowhere to go. */
    } else if ((size_t)c->to_client.len + len > PGW_MAX_PYTHON_QUEUE) {
        rc = PGW_EFULL;
    } else if (pgw_buf_append(&c->to_client, data, len) < 0) {
        rc = PGW_ENOMEM;
    } else {
        /* Sent from this thread when the socket takes it: no hop to the worker. */
        if (c->mode == PGW_MODE_PYTHON)
            pgw_flush_client(e, c);
        *queued = c->to_client.len;
        if (*queued > PGW_HIGH_WATER)
            c->want_drained = 1;
        if (c->client_dead || c->mode == PGW_MODE_HANDSHAKE)
            pgw_kick(c, 1);
    }
    pthread_mutex_unlock(&c->mu);
    return rc;
}

int pgw_engine_pause(pgw_engine *e, uint64_t id, int paused) {
    pgw_conn *c = pgw_lock_conn(e, id);
    if (!c)
        return PGW_ENOCONN;
    int was = c->paused;
    c->paused = paused ? 1 : 0;
    if (was && !paused && c->mode == PGW_MODE_PYTHON)
        pgw_kick(c, 1);
    pthread_mutex_unlock(&c->mu);
    return PGW_OK;
}

int pgw_engine_splice(pgw_engine *e, uint64_t id, int compute_fd, const uint8_t *to_client,
                      size_t len, int flags, int status) {
    pgw_conn *c = pgw_lock_conn(e, id);
    if (!c)
        return PGW_ENOCONN;
    if (c->mode != PGW_MODE_PYTHON || c->close_req) {
        pthread_mutex_unlock(&c->mu);
        return PGW_EMODE;
    }
    if ((size_t)c->to_client.len + len > PGW_MAX_PYTHON_QUEUE) {
        pthread_mutex_unlock(&c->mu);
        return PGW_EFULL;
    }
    socket_options(compute_fd);
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET,
                             .data.ptr = (void *)((uintptr_t)c | 1)};
    if (epoll_ctl(c->w->epfd, EPOLL_CTL_ADD, compute_fd, &ev) < 0) {
        int saved = errno;
        pthread_mutex_unlock(&c->mu);
        errno = saved;
        return PGW_ESYS;
    }
    c->pfd = compute_fd;
    c->pwhy = 0;
    c->p_hup = 0;
    c->pr_ready = c->pw_ready = 1;
    c->compute_shut = 0;
    c->cblock = c->pblock = c->client_hold = 0;
    c->want_drained = 0;
    c->yield_when = 0;
    c->splice_flags = (uint8_t)flags;
    pgw_backend_init(&c->back);
    pgw_frontend_init(&c->front);
    c->back.status = (uint8_t)status;
    c->bytes_from_client = c->bytes_from_compute = 0;
    c->last_activity = pgw_now();
    c->mode = PGW_MODE_SPLICE;
    /* The compute's bytes that came with the login go through the tracker like
     * any other; the client's that Python has not read go to the compute first. */
    if (len) {
        c->bytes_from_compute += len;
        pgw_backend_feed(&c->back, to_client, len);
        if (!c->client_dead && pgw_buf_append(&c->to_client, to_client, len) < 0)
            c->client_dead = 1, c->cwhy = PGW_WHY_NOMEM;
    }
    if (c->in.len) {
        c->bytes_from_client += c->in.len;
        pgw_frontend_feed(&c->front, c->in.data + c->in.off, c->in.len);
        c->to_compute = c->in;
        memset(&c->in, 0, sizeof c->in);
    }
    c->readable_sent = 0;
    pgw_kick(c, 1);
    pthread_mutex_unlock(&c->mu);
    return PGW_OK;
}

int pgw_engine_request_yield(pgw_engine *e, uint64_t id, int when) {
    pgw_conn *c = pgw_lock_conn(e, id);
    if (!c)
        return PGW_ENOCONN;
    int rc = PGW_OK;
    if (c->mode != PGW_MODE_SPLICE || c->close_req)
        rc = PGW_EMODE;
    else {
        if (when > c->yield_when)
            c->yield_when = (uint8_t)when;
        pgw_kick(c, 1);
    }
    pthread_mutex_unlock(&c->mu);
    return rc;
}

int pgw_engine_state(pgw_engine *e, uint64_t id, pgw_state *s) {
    pgw_conn *c = pgw_lock_conn(e, id);
    if (!c)
        return PGW_ENOCONN;
    s->mode = c->mode;
    s->status = c->back.status;
    s->ready_count = c->back.ready_count;
    s->requests = c->front.requests;
    s->unsynced = c->front.unsynced;
    s->copying = c->back.copying;
    s->fatal = c->back.fatal;
    s->front_broken = c->front.f.broken;
    s->back_broken = c->back.f.broken;
    s->terminated = c->front.terminated;
    s->front_at_boundary = pgw_at_boundary(&c->front.f);
    s->back_at_boundary = pgw_at_boundary(&c->back.f);
    s->back_last_type = c->back.f.last_type;
    s->last_client_activity = c->last_activity;
    s->bytes_from_client = c->bytes_from_client;
    s->bytes_from_compute = c->bytes_from_compute;
    s->client_queued = c->to_client.len + c->tout.len;
    s->front_skip = c->front.f.skip;
    s->front_head_len = c->front.f.head_len;
    memcpy(s->front_head, c->front.f.head, sizeof s->front_head);
    pthread_mutex_unlock(&c->mu);
    return PGW_OK;
}

int pgw_engine_close(pgw_engine *e, uint64_t id, int abort) {
    pgw_conn *c = pgw_lock_conn(e, id);
    if (!c)
        return PGW_ENOCONN;
    c->close_req = 1;
    if (abort)
        c->abort_req = 1;
    pgw_kick(c, 1);
    pthread_mutex_unlock(&c->mu);
    return PGW_OK;
}
