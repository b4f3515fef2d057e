/* The engine (see engine.h): worker threads, the connection table, the event
 * queue. The calls Python makes are in engine_api.c; a connection's I/O in
 * engine_io.c, its SPLICE mode in engine_splice.c.
 *
 * Lifetime: only a conn's worker frees it, at the end of a loop iteration,
 * after taking it out of the table and passing through its mutex once (a
 * Python call that found it before holds that mutex and sees `dead`). Lock
 * order: table_mu, then a conn's mu, then ev_mu or a worker's kick_mu. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "engine_int.h"

#define PGW_MAX_EVENTS 256



double pgw_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

pgw_engine *pgw_worker_engine(pgw_worker *w) { return w->e; }

/* ---- events ---- */

pgw_event *pgw_event_new(const pgw_conn *c, int kind) {
    pgw_event *ev = calloc(1, sizeof *ev);
    if (!ev)
        return NULL;
    ev->conn_id = c->id;
    ev->kind = kind;
    ev->fd = -1;
    ev->cert_index = -1;
    return ev;
}

void pgw_event_free(pgw_event *ev) {
    free(ev->server_name);
    free(ev->data);
    free(ev);
}

void pgw_emit(pgw_engine *e, pgw_event *ev) {
    if (!ev)
        return;
    pthread_mutex_lock(&e->ev_mu);
    int was_empty = e->ev_head == NULL;
    if (e->ev_tail)
        e->ev_tail->next = ev;
    else
        e->ev_head = ev;
    e->ev_tail = ev;
    pthread_mutex_unlock(&e->ev_mu);
    if (was_empty) {
        uint64_t one = 1;
        /* Cannot fail short of a counter overflow: the reader drains it. */
        if (write(e->evfd, &one, sizeof one) < 0)
            (void)0;
    }
}

pgw_event *pgw_engine_events(pgw_engine *e) {
    uint64_t count;
    /* Drain the eventfd before the queue: an event pushed after this read
     * writes it again, so none is left unannounced. */
    if (read(e->evfd, &count, sizeof count) < 0)
        (void)0;
    pthread_mutex_lock(&e->ev_mu);
    pgw_event *head = e->ev_head;
    e->ev_head = e->ev_tail = NULL;
    pthread_mutex_unlock(&e->ev_mu);
    return head;
}

int pgw_engine_fileno(pgw_engine *e) { return e->evfd; }

/* ---- kicks: Python asks a worker to look at a conn ---- */

void pgw_kick(pgw_conn *c, int wake) {
    pgw_worker *w = c->w;
    int was_empty = 0;
    pthread_mutex_lock(&w->kick_mu);
    if (!c->kicked) {
        c->kicked = 1;
        was_empty = w->kicks == NULL;
        c->kick_next = w->kicks;
        w->kicks = c;
    }
    pthread_mutex_unlock(&w->kick_mu);
    if (was_empty && wake) {
        uint64_t one = 1;
        if (write(w->kickfd, &one, sizeof one) < 0)
            (void)0;
    }
}

/* ---- the connection table ---- */

int pgw_table_insert(pgw_engine *e, pgw_conn *c) {
    if (!e->n_free) {
        uint32_t n = e->nslots ? e->nslots * 2 : 64;
        pgw_conn **slots = realloc(e->slots, n * sizeof *slots);
        if (!slots)
            return -1;
        e->slots = slots;
        uint32_t *gens = realloc(e->gens, n * sizeof *gens);
        if (!gens)
            return -1;
        e->gens = gens;
        uint32_t *free_slots = realloc(e->free_slots, n * sizeof *free_slots);
        if (!free_slots)
            return -1;
        e->free_slots = free_slots;
        for (uint32_t i = n; i > e->nslots; i--) {
            e->slots[i - 1] = NULL;
            e->gens[i - 1] = 1;
            e->free_slots[e->n_free++] = i - 1;
        }
        e->nslots = n;
    }
    uint32_t slot = e->free_slots[--e->n_free];
    e->slots[slot] = c;
    c->id = ((uint64_t)e->gens[slot] << 32) | slot;
    return 0;
}

void pgw_table_remove(pgw_engine *e, pgw_conn *c) {
    uint32_t slot = (uint32_t)c->id;
    if (slot < e->nslots && e->slots[slot] == c) {
        e->slots[slot] = NULL;
        e->gens[slot] = e->gens[slot] == UINT32_MAX ? 1 : e->gens[slot] + 1;
        e->free_slots[e->n_free++] = slot;
    }
}

/* The live conn `id`, locked; NULL when unknown, stale or dead. */
pgw_conn *pgw_lock_conn(pgw_engine *e, uint64_t id) {
    uint32_t slot = (uint32_t)id, gen = (uint32_t)(id >> 32);
    pgw_conn *c = NULL;
    pthread_mutex_lock(&e->table_mu);
    if (slot < e->nslots && e->gens[slot] == gen)
        c = e->slots[slot];
    if (c)
        pthread_mutex_lock(&c->mu);
    pthread_mutex_unlock(&e->table_mu);
    if (c && c->dead) {
        pthread_mutex_unlock(&c->mu);
        c = NULL;
    }
    return c;
}

void pgw_conn_free(pgw_conn *c) {
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* A dead conn leaves the table; it is freed at the end of the iteration. */
static void retire(pgw_worker *w, pgw_conn *c) {
    pthread_mutex_lock(&w->e->table_mu);
    pgw_table_remove(w->e, c);
    pthread_mutex_unlock(&w->e->table_mu);
    pthread_mutex_lock(&c->mu); /* waits out a Python call that found it before */
    pthread_mutex_unlock(&c->mu);
    c->free_next = w->retired;
    w->retired = c;
}

/* ---- workers ---- */

static void run(pgw_worker *w, pgw_conn *c) {
    pthread_mutex_lock(&c->mu);
    if (c->dead) {
        pthread_mutex_unlock(&c->mu);
        return;
    }
    pgw_progress(w, c);
    int dead = c->dead;
    pthread_mutex_unlock(&c->mu);
    if (dead)
        retire(w, c);
}

static void *worker_main(void *arg) {
    pgw_worker *w = arg;
    struct epoll_event evs[PGW_MAX_EVENTS];
    while (!atomic_load(&w->stop)) {
        pthread_mutex_lock(&w->kick_mu);
        int timeout = w->kicks ? 0 : -1;
        pthread_mutex_unlock(&w->kick_mu);
        if (w->lingering && timeout < 0)
            timeout = 1000;
        int n = epoll_wait(w->epfd, evs, PGW_MAX_EVENTS, timeout);
        for (int i = 0; i < n; i++) {
            uintptr_t tag = (uintptr_t)evs[i].data.ptr;
            uint32_t events = evs[i].events;
            if (!tag) {
                uint64_t count;
                if (read(w->kickfd, &count, sizeof count) < 0)
                    (void)0;
                continue;
            }
            pgw_conn *c = (pgw_conn *)(tag & ~(uintptr_t)1);
            pthread_mutex_lock(&c->mu);
            if (c->dead) {
                pthread_mutex_unlock(&c->mu);
                continue;
            }
            if (tag & 1) {
                if (c->pfd >= 0) {
                    if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
                        c->p_hup = 1;
                    if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
                        c->pr_ready = 1;
                    if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
                        c->pw_ready = 1;
                }
            } else if (c->ssl) {
                /* OpenSSL may read to write or write to read: retry both. */
                c->cr_ready = c->cw_ready = 1;
                c->bio_drained = 0;
                if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
                    c->c_hup = 1;
            } else {
                if (events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR))
                    c->c_hup = 1;
                if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
                    c->cr_ready = 1;
                if (events & (EPOLLOUT | EPOLLHUP | EPOLLERR))
                    c->cw_ready = 1;
            }
            pgw_progress(w, c);
            int dead = c->dead;
            pthread_mutex_unlock(&c->mu);
            if (dead)
                retire(w, c);
        }
        /* Kicked conns: detached under the lock, so a kick meanwhile re-queues. */
        pgw_conn *todo = NULL;
        pthread_mutex_lock(&w->kick_mu);
        for (pgw_conn *c = w->kicks; c; c = c->kick_next) {
            c->kicked = 0;
            c->run_next = todo;
            todo = c;
        }
        w->kicks = NULL;
        pthread_mutex_unlock(&w->kick_mu);
        for (pgw_conn *c = todo; c; c = c->run_next)
            run(w, c);
        if (w->lingering) {
            double now = pgw_now();
            pgw_conn *next;
            for (pgw_conn *c = w->lingering; c; c = next) {
                next = c->linger_next;
                if (now >= c->linger_deadline)
                    run(w, c); /* past its deadline: close_step closes it */
            }
        }
        while (w->retired) {
            pgw_conn *c = w->retired;
            w->retired = c->free_next;
            pgw_conn_free(c);
        }
    }
    free(w->buf);
    w->buf = NULL;
    return NULL;
}

pgw_engine *pgw_engine_new(int threads, char *err, size_t errlen) {
    if (threads < 1 || threads > 256) {
        snprintf(err, errlen, "threads must be between 1 and 256");
        return NULL;
    }
    pgw_engine *e = calloc(1, sizeof *e);
    if (!e) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&e->ev_mu, NULL);
    pthread_mutex_init(&e->table_mu, NULL);
    e->evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->workers = calloc((size_t)threads, sizeof *e->workers);
    if (e->evfd < 0 || !e->workers) {
        snprintf(err, errlen, "cannot create the engine: %s", strerror(errno));
        goto fail;
    }
    e->nthreads = threads;
    for (int i = 0; i < threads; i++) {
        pgw_worker *w = &e->workers[i];
        w->e = e;
        w->epfd = w->kickfd = -1;
        pthread_mutex_init(&w->kick_mu, NULL);
        atomic_init(&w->stop, 0);
    }
    /* Workers take no signals: Python's handlers run on its main thread, and a
     * write to a closed socket must return EPIPE, not raise SIGPIPE. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    for (int i = 0; i < threads; i++) {
        pgw_worker *w = &e->workers[i];
        w->epfd = epoll_create1(EPOLL_CLOEXEC);
        w->kickfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        w->buf = malloc(PGW_READ_BUFFER);
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
        if (w->epfd < 0 || w->kickfd < 0 || !w->buf ||
            epoll_ctl(w->epfd, EPOLL_CTL_ADD, w->kickfd, &ev) < 0) {
            snprintf(err, errlen, "cannot create a worker: %s", strerror(errno));
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            goto fail;
        }
        int rc = pthread_create(&w->thread, NULL, worker_main, w);
        if (rc) {
            snprintf(err, errlen, "cannot start a worker: %s", strerror(rc));
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            goto fail;
        }
        w->started = 1;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    return e;
fail:
    pgw_engine_shutdown(e);
    pgw_engine_free(e);
    return NULL;
}

void pgw_engine_shutdown(pgw_engine *e) {
    pthread_mutex_lock(&e->table_mu);
    int already = e->shut;
    e->shut = 1;
    pthread_mutex_unlock(&e->table_mu);
    if (already)
        return;
    for (int i = 0; i < e->nthreads; i++) {
        pgw_worker *w = &e->workers[i];
        if (!w->started)
            continue;
        atomic_store(&w->stop, 1);
        uint64_t one = 1;
        if (write(w->kickfd, &one, sizeof one) < 0)
            (void)0;
        pthread_join(w->thread, NULL);
        w->started = 0;
    }
    /* The threads are gone: every conn left is closed here. */
    pthread_mutex_lock(&e->table_mu);
    for (uint32_t slot = 0; slot < e->nslots; slot++) {
        pgw_conn *c = e->slots[slot];
        if (!c)
            continue;
        pgw_table_remove(e, c);
        pthread_mutex_lock(&c->mu); /* an accept() may still hold it */
        pthread_mutex_unlock(&c->mu);
        pgw_release(c, -1);
        pgw_conn_free(c);
    }
    pgw_tls_table_unref(e->tls);
    e->tls = NULL;
    pthread_mutex_unlock(&e->table_mu);
    for (int i = 0; i < e->nthreads; i++) {
        pgw_worker *w = &e->workers[i];
        while (w->retired) {
            pgw_conn *c = w->retired;
            w->retired = c->free_next;
            pgw_conn_free(c);
        }
        if (w->epfd >= 0)
            close(w->epfd);
        if (w->kickfd >= 0)
            close(w->kickfd);
        w->epfd = w->kickfd = -1;
        free(w->buf);
        w->buf = NULL;
    }
    /* Events nobody will read: a yielded compute fd is ours to close. */
    pgw_event *ev = pgw_engine_events(e);
    while (ev) {
        pgw_event *next = ev->next;
        if (ev->fd >= 0)
            close(ev->fd);
        pgw_event_free(ev);
        ev = next;
    }
}

void pgw_engine_free(pgw_engine *e) {
    if (e->evfd >= 0)
        close(e->evfd);
    for (int i = 0; i < e->nthreads; i++)
        pthread_mutex_destroy(&e->workers[i].kick_mu);
    free(e->workers);
    free(e->slots);
    free(e->gens);
    free(e->free_slots);
    pthread_mutex_destroy(&e->ev_mu);
    pthread_mutex_destroy(&e->table_mu);
    free(e);
}
