/* One connection's I/O (see engine_int.h): both sockets, the TLS handshake,
 * PYTHON-mode reading, closing, and the per-conn loop (SPLICE mode's step is
 * in engine_splice.c).
 * Everything here runs under the conn's mutex; only pgw_flush_client also runs
 * on Python's thread (write()). Chunks are read into the worker's one buffer
 * and written on at once; only what a peer does not take is queued. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/err.h>

#include "engine_int.h"

/* Rounds of work for one conn before the others get their turn. */
#define PGW_ROUNDS 16

/* ---- byte queues ---- */

int pgw_buf_append(pgw_buf *b, const uint8_t *p, size_t n) {
    if (!n)
        return 0;
    if (n > UINT32_MAX - (size_t)b->len - 4096)
        return -1;
    size_t need = (size_t)b->len + n;
    if ((size_t)b->off + need > b->cap) {
        if (b->off) { /* slide to the front before growing */
            memmove(b->data, b->data + b->off, b->len);
            b->off = 0;
        }
        if (need > b->cap) {
            size_t cap = b->cap ? (size_t)b->cap * 2 : 4096;
            while (cap < need)
                cap *= 2;
            if (cap > UINT32_MAX)
                cap = need;
            uint8_t *data = realloc(b->data, cap);
            if (!data)
                return -1;
            b->data = data;
            b->cap = (uint32_t)cap;
        }
    }
    memcpy(b->data + b->off + b->len, p, n);
    b->len += (uint32_t)n;
    return 0;
}

void pgw_buf_consume(pgw_buf *b, size_t n) {
    if (n >= b->len) {
        pgw_buf_free(b);
        return;
    }
    b->off += (uint32_t)n;
    b->len -= (uint32_t)n;
}

void pgw_buf_free(pgw_buf *b) {
    free(b->data);
    b->data = NULL;
    b->off = b->len = b->cap = 0;
}

/* ---- events and reasons ---- */

void pgw_reason(const pgw_conn *c, int why, char *out, size_t outlen) {
    if (why == PGW_WHY_EOF)
        snprintf(out, outlen, "eof");
    else if (why == PGW_WHY_NOMEM)
        snprintf(out, outlen, "out of memory");
    else if (why == PGW_WHY_TLS && c->tls_why)
        snprintf(out, outlen, "tls error: %s", c->tls_why);
    else if (why == PGW_WHY_TLS) {
        const char *r = c->ssl_err ? ERR_reason_error_string(c->ssl_err) : NULL;
        snprintf(out, outlen, "tls error: %s", r ? r : "protocol error");
    } else if (why > 0) {
        char buf[64];
        snprintf(out, outlen, "%s", strerror_r(why, buf, sizeof buf));
    } else
        snprintf(out, outlen, "closed");
}

void pgw_emit_reason(pgw_engine *e, pgw_conn *c, int kind, int why, const char *text) {
    pgw_event *ev = pgw_event_new(c, kind);
    if (!ev)
        return;
    if (text)
        snprintf(ev->reason, sizeof ev->reason, "%s", text);
    else
        pgw_reason(c, why, ev->reason, sizeof ev->reason);
    pgw_emit(e, ev);
}

/* ---- the two sockets ---- */

static void client_failed(pgw_conn *c, int why) {
    if (!c->cwhy)
        c->cwhy = why;
    c->client_dead = 1;
}

static void tls_failed(pgw_conn *c, int ssl_error) {
    if (ssl_error == SSL_ERROR_ZERO_RETURN) {
        c->client_eof = 1;
        if (!c->cwhy)
            c->cwhy = PGW_WHY_EOF;
        return;
    }
    if (ssl_error == SSL_ERROR_SYSCALL && errno) {
        client_failed(c, errno);
    } else {
        c->ssl_err = (uint32_t)ERR_peek_last_error();
        client_failed(c, PGW_WHY_TLS);
    }
    ERR_clear_error();
}

/* Called by OpenSSL around each operation on the client socket's BIO: a read
 * shorter than asked for drained the socket (read-ahead asks for the whole
 * record buffer), so client_recv need not call SSL_read once more just to
 * hear EAGAIN: with edge-triggered epoll, later bytes bring a new event. */
static long on_bio(BIO *b, int oper, const char *argp, size_t len, int argi, long argl,
                   int ret, size_t *processed) {
    (void)argp;
    (void)argi;
    (void)argl;
    if (oper == (BIO_CB_READ | BIO_CB_RETURN)) {
        pgw_conn *c = (pgw_conn *)BIO_get_callback_arg(b);
        c->bio_drained = ret > 0 && processed && *processed < len;
    }
    return ret;
}

void pgw_watch_reads(pgw_conn *c) {
    BIO *b = SSL_get_rbio(c->ssl);
    if (b) {
        BIO_set_callback_arg(b, (char *)c);
        BIO_set_callback_ex(b, on_bio);
    }
}

/* Sends up to `n` bytes on `fd`; returns how many it took. *blocked: it would
 * block; *err: the errno it failed with (0: none). */
static size_t send_some(int fd, const uint8_t *p, size_t n, int *blocked, int *err) {
    size_t done = 0;
    *blocked = *err = 0;
    while (done < n) {
        ssize_t r = send(fd, p + done, n - done, MSG_NOSIGNAL);
        if (r > 0) {
            done += (size_t)r;
        } else if (r < 0 && errno == EINTR) {
            continue;
        } else if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            *blocked = 1;
            break;
        } else {
            *err = r < 0 ? errno : EPIPE;
            break;
        }
    }
    return done;
}

/* One recv of up to `cap` bytes from `fd`; returns how many came. *drained:
 * the socket holds no more now (EAGAIN, or a short read unless a FIN already
 * reported is still to be read), so the next bytes bring a new edge. *why:
 * PGW_WHY_EOF, or the errno it failed with (0: neither). */
static size_t recv_some(int fd, uint8_t *buf, size_t cap, int hup, int *drained, int *why) {
    *drained = *why = 0;
    for (;;) {
        ssize_t r = recv(fd, buf, cap, 0);
        if (r > 0) {
            *drained = (size_t)r < cap && !hup;
            return (size_t)r;
        }
        if (r == 0)
            *why = PGW_WHY_EOF;
        else if (errno == EINTR)
            continue;
        else if (errno == EAGAIN || errno == EWOULDBLOCK)
            *drained = 1;
        else
            *why = errno;
        return 0;
    }
}

/* Writes up to `n` bytes to the client's socket as they are; returns how many
 * it took. */
static size_t raw_send(pgw_conn *c, const uint8_t *p, size_t n) {
    int blocked, err;
    size_t done = send_some(c->cfd, p, n, &blocked, &err);
    if (blocked)
        c->cw_ready = 0;
    if (err)
        client_failed(c, err);
    return done;
}

/* TLS 1.3 after the handshake (tls_records.h): the client failed its TLS;
 * the alert it is owed goes out if the socket takes it now. */
static void t13_failed(pgw_conn *c) {
    uint8_t alert[32];
    uint8_t owed = pgw_tls13_alert_owed(c->t13);
    size_t n = owed && !c->tout.len ? pgw_tls13_alert(c->t13, owed, alert, sizeof alert) : 0;
    if (n && c->cw_ready)
        raw_send(c, alert, n);
    c->tls_why = pgw_tls13_error(c->t13);
    client_failed(c, PGW_WHY_TLS);
}

/* The callers read into PGW_READ_BUFFER bytes: a partial record and a whole
 * one after it always fit. */
_Static_assert(PGW_READ_BUFFER >= 2 * PGW_TLS13_MAX_RECORD, "read buffer too small for TLS");

/* Reads records with one recv (read-ahead: as much as `buf` holds) after
 * what is left of a partial one, and opens them in place: `buf` ends up
 * holding plaintext only (never more than the ciphertext it came from). */
static size_t t13_recv(pgw_conn *c, uint8_t *buf, size_t cap) {
    size_t have = c->rin.len, got = 0;
    int drained, why;
    if (have) {
        memcpy(buf, c->rin.data + c->rin.off, have);
        pgw_buf_free(&c->rin);
    }
    have += recv_some(c->cfd, buf + have, cap - have, c->c_hup, &drained, &why);
    if (drained)
        c->cr_ready = 0;
    if (why > 0) {
        client_failed(c, why);
        return 0;
    }
    size_t used = 0;
    int rc = pgw_tls13_open(c->t13, buf, have, &used, &got);
    if (rc == PGW_TLS13_FAILED) {
        t13_failed(c);
    } else if (rc == PGW_TLS13_CLOSED || why == PGW_WHY_EOF) {
        /* close_notify, or an EOF (a cut record included), as OpenSSL's
         * SSL_OP_IGNORE_UNEXPECTED_EOF reads it. */
        c->client_eof = 1;
        if (!c->cwhy)
            c->cwhy = PGW_WHY_EOF;
    } else if (used < have && pgw_buf_append(&c->rin, buf + used, have - used) < 0) {
        client_failed(c, PGW_WHY_NOMEM);
    }
    if (rc == PGW_TLS13_OK && pgw_tls13_update_owed(c->t13))
        pgw_send_client(c, NULL, 0); /* the KeyUpdate the client asked for */
    return got;
}

/* Sends queued records first; 1 when none are left. */
static int t13_flush(pgw_conn *c) {
    if (c->tout.len && c->cw_ready && !c->client_dead)
        pgw_buf_consume(&c->tout, raw_send(c, c->tout.data + c->tout.off, c->tout.len));
    if (c->client_dead)
        pgw_buf_free(&c->tout);
    return !c->tout.len;
}

/* Seals p[0, n) and sends it; records the socket does not take wait in tout
 * (at most one sealing's worth). Returns how much of p was taken. */
static size_t t13_send(pgw_conn *c, const uint8_t *p, size_t n) {
    uint8_t records[PGW_TLS13_SEAL_BUFFER];
    size_t done = 0;
    while (t13_flush(c) && c->cw_ready && !c->client_dead &&
           (done < n || pgw_tls13_update_owed(c->t13))) {
        size_t len = 0;
        done += pgw_tls13_seal(c->t13, p + done, n - done, records, sizeof records, &len);
        if (!len) {
            c->tls_why = pgw_tls13_error(c->t13);
            client_failed(c, PGW_WHY_TLS);
            break;
        }
        size_t sent = raw_send(c, records, len);
        if (sent < len && !c->client_dead && pgw_buf_append(&c->tout, records + sent, len - sent) < 0)
            client_failed(c, PGW_WHY_NOMEM);
    }
    return done;
}

/* Reads what the client has, up to `cap` bytes, into `buf`. Sets client_eof or
 * client_dead when the client ends; clears cr_ready when it would block. */
size_t pgw_client_recv(pgw_conn *c, uint8_t *buf, size_t cap) {
    if (c->t13)
        return t13_recv(c, buf, cap);
    if (c->ssl) {
        /* One record per SSL_read: fill the buffer, so the peer gets one write. */
        size_t got = 0;
        while (got < cap) {
            size_t r = 0;
            if (SSL_read_ex(c->ssl, buf + got, cap - got, &r)) {
                got += r;
                if (c->bio_drained && !c->c_hup && !SSL_has_pending(c->ssl)) {
                    c->cr_ready = 0; /* drained, and OpenSSL holds nothing more */
                    break;
                }
                continue;
            }
            int err = SSL_get_error(c->ssl, 0);
            if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE)
                c->cr_ready = 0;
            else
                tls_failed(c, err);
            break;
        }
        return got;
    }
    int drained, why;
    size_t n = recv_some(c->cfd, buf, cap, c->c_hup, &drained, &why);
    if (drained)
        c->cr_ready = 0;
    if (why == PGW_WHY_EOF) {
        c->client_eof = 1;
        if (!c->cwhy)
            c->cwhy = PGW_WHY_EOF;
    } else if (why) {
        client_failed(c, why);
    }
    return n;
}

/* Writes up to `n` bytes to the client; returns how many it took. */
static size_t client_send(pgw_conn *c, const uint8_t *p, size_t n) {
    size_t done = 0;
    if (c->t13)
        return t13_send(c, p, n);
    if (c->ssl) {
        ERR_clear_error(); /* Python's thread shares OpenSSL's per-thread queue */
        while (done < n) {
            size_t w = 0;
            if (SSL_write_ex(c->ssl, p + done, n - done, &w)) {
                done += w;
                continue;
            }
            int err = SSL_get_error(c->ssl, 0);
            if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ)
                c->cw_ready = 0;
            else if (err == SSL_ERROR_ZERO_RETURN) /* the client said close_notify */
                client_failed(c, PGW_WHY_EOF);
            else
                tls_failed(c, err);
            break;
        }
        return done;
    }
    return raw_send(c, p, n);
}

size_t pgw_compute_recv(pgw_conn *c, uint8_t *buf, size_t cap) {
    int drained, why;
    size_t n = recv_some(c->pfd, buf, cap, c->p_hup, &drained, &why);
    if (drained)
        c->pr_ready = 0;
    if (why)
        c->pwhy = why;
    return n;
}

size_t pgw_compute_send(pgw_conn *c, const uint8_t *p, size_t n) {
    int blocked, err;
    size_t done = send_some(c->pfd, p, n, &blocked, &err);
    if (blocked)
        c->pw_ready = 0;
    if (err)
        c->pwhy = err;
    return done;
}

/* Sends `p` on to a side now when nothing is queued before it; queues the rest. */
void pgw_send_client(pgw_conn *c, const uint8_t *p, size_t n) {
    size_t done = 0;
    if (c->client_dead)
        return;
    if (!c->to_client.len && c->cw_ready)
        done = client_send(c, p, n);
    if (!n)
        return;
    if (done < n && !c->client_dead && pgw_buf_append(&c->to_client, p + done, n - done) < 0)
        client_failed(c, PGW_WHY_NOMEM);
}

void pgw_send_compute(pgw_conn *c, const uint8_t *p, size_t n) {
    size_t done = 0;
    if (c->pfd < 0 || c->pwhy)
        return;
    if (!c->to_compute.len && c->pw_ready)
        done = pgw_compute_send(c, p, n);
    if (done < n && !c->pwhy && pgw_buf_append(&c->to_compute, p + done, n - done) < 0)
        c->pwhy = PGW_WHY_NOMEM;
}

int pgw_flush_client(pgw_engine *e, pgw_conn *c) {
    int moved = 0;
    if (c->t13 && c->tout.len && c->cw_ready) {
        size_t before = c->tout.len;
        t13_flush(c);
        moved = c->tout.len < before;
    }
    if (c->to_client.len && c->cw_ready && !c->client_dead) {
        size_t n = client_send(c, c->to_client.data + c->to_client.off, c->to_client.len);
        pgw_buf_consume(&c->to_client, n);
        moved |= n > 0;
    }
    if (c->client_dead)
        pgw_buf_free(&c->to_client);
    if (c->to_client.len < PGW_LOW_WATER) {
        if (c->pblock) {
            c->pblock = 0;
            moved = 1;
        }
        if (c->want_drained && c->mode == PGW_MODE_PYTHON) {
            c->want_drained = 0;
            pgw_emit(e, pgw_event_new(c, PGW_EV_DRAINED));
        }
    }
    return moved;
}

static int flush_compute(pgw_conn *c) {
    int moved = 0;
    if (c->pfd < 0)
        return 0;
    if (c->to_compute.len && c->pw_ready && !c->pwhy) {
        size_t n = pgw_compute_send(c, c->to_compute.data + c->to_compute.off, c->to_compute.len);
        pgw_buf_consume(&c->to_compute, n);
        moved = n > 0;
    }
    if (c->to_compute.len < PGW_LOW_WATER && c->cblock) {
        c->cblock = 0;
        moved = 1;
    }
    return moved;
}

void pgw_drop_compute(pgw_conn *c, int epfd) {
    if (c->pfd >= 0) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->pfd, NULL);
        close(c->pfd);
        c->pfd = -1;
    }
    pgw_buf_free(&c->to_compute);
}

void pgw_release(pgw_conn *c, int epfd) {
    pgw_drop_compute(c, epfd);
    if (c->ssl) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    pgw_tls13_free(c->t13);
    c->t13 = NULL;
    pgw_buf_free(&c->rin);
    pgw_buf_free(&c->tout);
    if (c->cfd >= 0) {
        if (epfd >= 0)
            epoll_ctl(epfd, EPOLL_CTL_DEL, c->cfd, NULL);
        close(c->cfd);
        c->cfd = -1;
    }
    pgw_buf_free(&c->in);
    pgw_buf_free(&c->to_client);
    pgw_tls_choice_clear(&c->choice);
    pgw_tls_table_unref(c->table);
    c->table = NULL;
}

/* ---- closing ---- */

static void unlinger(pgw_worker *w, pgw_conn *c) {
    if (!c->lingering)
        return;
    if (c->linger_prev)
        c->linger_prev->linger_next = c->linger_next;
    else
        w->lingering = c->linger_next;
    if (c->linger_next)
        c->linger_next->linger_prev = c->linger_prev;
    c->linger_prev = c->linger_next = NULL;
    c->lingering = 0;
}

static void finalize(pgw_worker *w, pgw_conn *c, const char *reason) {
    if (c->ssl && c->mode != PGW_MODE_HANDSHAKE && !c->abort_req && !c->client_dead) {
        SSL_shutdown(c->ssl); /* close_notify, best effort: never waited for */
        ERR_clear_error();
    }
    if (c->t13 && !c->abort_req && !c->client_dead && !c->tout.len && c->cw_ready) {
        uint8_t alert[32];
        size_t n = pgw_tls13_alert(c->t13, 0, alert, sizeof alert); /* close_notify, likewise */
        if (n)
            raw_send(c, alert, n);
    }
    unlinger(w, c);
    pgw_release(c, w->epfd);
    c->mode = PGW_MODE_CLOSING;
    c->dead = 1;
    pgw_emit_reason(pgw_worker_engine(w), c, PGW_EV_CLOSED, 0, reason);
}

/* close(): flush what is queued (unless aborting), then close. 1 once closed. */
static int close_step(pgw_worker *w, pgw_conn *c) {
    if (c->mode != PGW_MODE_CLOSING) {
        c->mode = PGW_MODE_CLOSING; /* nothing more is read */
        pgw_buf_free(&c->in);
    }
    size_t pending = (c->client_dead ? 0 : c->to_client.len + c->tout.len) +
                     (c->pfd >= 0 && !c->pwhy ? c->to_compute.len : 0);
    if (c->abort_req || !pending || (c->lingering && pgw_now() >= c->linger_deadline)) {
        finalize(w, c, c->abort_req ? "aborted" : "closed");
        return 1;
    }
    if (!c->lingering) {
        c->lingering = 1;
        c->linger_deadline = pgw_now() + PGW_CLOSE_LINGER;
        c->linger_prev = NULL;
        c->linger_next = w->lingering;
        if (w->lingering)
            w->lingering->linger_prev = c;
        w->lingering = c;
    }
    return 0;
}

/* ---- handshake ---- */

static void handshake(pgw_worker *w, pgw_conn *c) {
    ERR_clear_error();
    int r = SSL_do_handshake(c->ssl);
    if (r == 1) {
        pgw_event *ev = pgw_event_new(c, PGW_EV_READY);
        if (!ev) {
            finalize(w, c, "out of memory");
            return;
        }
        const unsigned char *alpn = NULL;
        unsigned alpn_len = 0;
        SSL_get0_alpn_selected(c->ssl, &alpn, &alpn_len);
        ev->alpn = alpn_len == 10 && !memcmp(alpn, "postgresql", 10) ? "postgresql" : NULL;
        ev->cert_index = c->choice.cert_index < 0 ? 0 : c->choice.cert_index;
        ev->server_name = c->choice.server_name;
        c->choice.server_name = NULL;
        pgw_tls_table_unref(c->table);
        c->table = NULL;
        /* TLS 1.3: the records are ours from here, and OpenSSL's ~14 KB per
         * connection go; anything else stays with OpenSSL, reading ahead now. */
        if ((c->t13 = pgw_tls13_take(c->ssl, &c->choice))) {
            SSL_free(c->ssl);
            c->ssl = NULL;
            ev->records = "tls1.3";
        } else {
            SSL_set_read_ahead(c->ssl, 1);
            ev->records = "openssl";
        }
        pgw_tls_choice_clear(&c->choice);
        c->mode = PGW_MODE_PYTHON;
        c->cr_ready = c->cw_ready = 1; /* read-ahead may hold the first bytes already */
        pgw_emit(pgw_worker_engine(w), ev);
        return;
    }
    int err = SSL_get_error(c->ssl, r);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
        c->cr_ready = 0;
        return;
    }
    char reason[96];
    unsigned long code = ERR_peek_last_error();
    if (c->choice.failed)
        snprintf(reason, sizeof reason, "tls handshake failed: invalid server name");
    else if (code)
        snprintf(reason, sizeof reason, "tls handshake failed: %s",
                 ERR_reason_error_string(code) ? ERR_reason_error_string(code) : "error");
    else if (err == SSL_ERROR_SYSCALL && errno)
        snprintf(reason, sizeof reason, "tls handshake failed: %s", strerror(errno));
    else
        snprintf(reason, sizeof reason, "tls handshake failed: eof");
    ERR_clear_error();
    /* The handshake reads record by record: what the client sent past the bad
     * one is unread, and closing over unread bytes would send it a reset
     * instead of the alert and a FIN. */
    uint8_t scrap[4096];
    for (int i = 0; i < 16 && recv(c->cfd, scrap, sizeof scrap, 0) > 0; i++)
        ;
    c->client_dead = 1; /* no close_notify after a failed handshake */
    finalize(w, c, reason);
}

/* ---- PYTHON mode ---- */

static int python_step(pgw_worker *w, pgw_conn *c) {
    int did = 0;
    if (c->cr_ready && !c->paused && !c->client_eof && !c->client_dead &&
        c->in.len < PGW_HIGH_WATER) {
        size_t n = pgw_client_recv(c, w->buf, PGW_READ_BUFFER);
        if (n) {
            c->last_activity = pgw_now();
            if (pgw_buf_append(&c->in, w->buf, n) < 0)
                client_failed(c, PGW_WHY_NOMEM);
            did = 1;
        }
        if (c->client_eof || c->client_dead)
            did = 1;
    }
    if (!c->readable_sent && (c->in.len || c->client_eof || c->client_dead)) {
        c->readable_sent = 1;
        pgw_emit(pgw_worker_engine(w), pgw_event_new(c, PGW_EV_READABLE));
    }
    return did;
}

void pgw_progress(pgw_worker *w, pgw_conn *c) {
    pgw_engine *e = pgw_worker_engine(w);
    if (c->mode == PGW_MODE_HANDSHAKE) {
        if (c->close_req) {
            finalize(w, c, c->abort_req ? "aborted" : "closed");
            return;
        }
        handshake(w, c);
        if (c->mode == PGW_MODE_HANDSHAKE || c->dead)
            return;
    }
    for (int round = 0;; round++) {
        if (round == PGW_ROUNDS) {
            pgw_kick(c, 0); /* more to do: after the other conns' turn */
            return;
        }
        int did = pgw_flush_client(e, c);
        did |= flush_compute(c);
        if (c->close_req) {
            if (close_step(w, c))
                return;
        } else if (c->mode == PGW_MODE_SPLICE) {
            did |= pgw_splice_step(w, c);
        } else if (c->mode == PGW_MODE_PYTHON) {
            did |= python_step(w, c);
        }
        if (!did)
            return;
    }
}
