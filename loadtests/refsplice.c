/* refsplice: a measurement reference for issue 12, not product code.
 *
 * The smallest TLS splice worth comparing pgwake's data plane and PgBouncer
 * with: one thread, epoll, OpenSSL server TLS with read-ahead. It answers
 * PostgreSQL's SSLRequest with 'S' (a GSSENCRequest with 'N', then reads the
 * next request, as PostgreSQL does), terminates TLS, and splices the client's
 * decrypted bytes to the compute over plain TCP and back. Nothing else: no
 * routing, auth, limits or flow control. The request and TLS handshake block
 * (with a timeout) in the accept path, and a write that would block or that
 * is partial closes the connection: fine for pgbench -S, whose messages are
 * small. loadtests/splicecpu.py compiles and runs it.
 *
 * usage: refsplice LISTEN_PORT COMPUTE_PORT CERT KEY READAHEAD(0|1)
 * Prints "ready" on stdout once it listens; errors go to stderr.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define SSL_REQUEST 80877103u
#define GSSENC_REQUEST 80877104u

typedef struct conn {
    int cfd, pfd; /* client (TLS), compute (plain) */
    SSL *ssl;
    int dead;
    struct conn *next_dead;
} conn;

static char buf[65536];
static conn *graveyard; /* closed during this epoll batch; freed after it */

static void tune(int fd, int nonblocking) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (nonblocking)
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

/* Close both sides at once; the struct lives until the batch ends, because
 * the same batch may still hold an event for the other fd. */
static void kill_conn(conn *k, int ep, int notify) {
    if (k->dead)
        return;
    k->dead = 1;
    if (notify)
        SSL_shutdown(k->ssl); /* close_notify, best effort (non-blocking) */
    epoll_ctl(ep, EPOLL_CTL_DEL, k->cfd, NULL);
    epoll_ctl(ep, EPOLL_CTL_DEL, k->pfd, NULL);
    ERR_clear_error(); /* the queue is per thread: stale errors would confuse the next
                          SSL_get_error */
    close(k->cfd);
    close(k->pfd);
    k->next_dead = graveyard;
    graveyard = k;
}

static int read_full(int fd, unsigned char *p, size_t n) {
    while (n) {
        ssize_t r = recv(fd, p, n, 0);
        if (r <= 0) {
            if (r < 0 && errno == EINTR)
                continue;
            return -1;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

/* The pre-TLS negotiation: 0 when the client asked for TLS and got 'S'. */
static int negotiate(int fd) {
    for (int round = 0; round < 2; round++) {
        unsigned char req[8];
        if (read_full(fd, req, sizeof req))
            return -1;
        uint32_t len, code;
        memcpy(&len, req, 4);
        memcpy(&code, req + 4, 4);
        len = ntohl(len), code = ntohl(code);
        if (len != 8)
            return -1; /* a StartupMessage or CancelRequest: TLS only here */
        char answer = code == SSL_REQUEST ? 'S' : code == GSSENC_REQUEST ? 'N' : 0;
        if (!answer || send(fd, &answer, 1, MSG_NOSIGNAL) != 1)
            return -1;
        if (answer == 'S')
            return 0;
    }
    return -1; /* GSSENCRequest twice */
}

static int connect_compute(int port) {
    int p = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in b = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    b.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (p >= 0 && connect(p, (struct sockaddr *)&b, sizeof b) == 0)
        return p;
    perror("connect to compute");
    if (p >= 0)
        close(p);
    return -1;
}

/* Compute → client: one recv per readiness (level-triggered), re-encrypted. */
static void from_compute(conn *k, int ep) {
    ssize_t r = recv(k->pfd, buf, sizeof buf, 0);
    if (r < 0 && (errno == EAGAIN || errno == EINTR))
        return;
    if (r <= 0) {
        kill_conn(k, ep, 1);
        return;
    }
    size_t w;
    if (!SSL_write_ex(k->ssl, buf, (size_t)r, &w) || w != (size_t)r) {
        fprintf(stderr, "client write blocked or failed: closing\n");
        kill_conn(k, ep, 0);
    }
}

/* Client → compute, until OpenSSL holds nothing more: read-ahead buffers bytes epoll
 * cannot see, but what is left in the socket epoll reports again (level-triggered),
 * so no extra read(2) that would only say EAGAIN. */
static void from_client(conn *k, int ep) {
    for (;;) {
        size_t r;
        if (!SSL_read_ex(k->ssl, buf, sizeof buf, &r)) {
            /* Anything but WANT_READ ends the session (a client's EOF without
             * close_notify, libpq's way, is SSL_ERROR_SSL in OpenSSL 3). */
            if (SSL_get_error(k->ssl, 0) != SSL_ERROR_WANT_READ)
                kill_conn(k, ep, 0);
            return;
        }
        if (send(k->pfd, buf, r, MSG_NOSIGNAL) != (ssize_t)r) {
            fprintf(stderr, "compute write blocked or failed: closing\n");
            kill_conn(k, ep, 0);
            return;
        }
        if (!SSL_has_pending(k->ssl))
            return;
    }
}

static void accept_one(int ls, int ep, SSL_CTX *ctx, int compute_port) {
    int c = accept(ls, NULL, NULL);
    if (c < 0)
        return;
    struct timeval limit = {.tv_sec = 10}; /* a silent client must not stall the loop */
    setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
    setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &limit, sizeof limit);
    tune(c, 0);
    SSL *s = NULL;
    int p = -1;
    if (negotiate(c) == 0 && (s = SSL_new(ctx)) && SSL_set_fd(s, c) && SSL_accept(s) == 1 &&
        (p = connect_compute(compute_port)) >= 0) {
        tune(c, 1);
        tune(p, 1);
        conn *k = calloc(1, sizeof *k);
        if (k) {
            k->cfd = c, k->pfd = p, k->ssl = s;
            /* the low bit of the event's tag says which side: 0 client, 1 compute */
            struct epoll_event e1 = {.events = EPOLLIN, .data.u64 = (uintptr_t)k};
            struct epoll_event e2 = {.events = EPOLLIN, .data.u64 = (uintptr_t)k | 1};
            if (epoll_ctl(ep, EPOLL_CTL_ADD, c, &e1) == 0 &&
                epoll_ctl(ep, EPOLL_CTL_ADD, p, &e2) == 0)
                from_client(k, ep); /* read-ahead may have taken the StartupMessage in
                                       with the handshake: epoll will not report it */
            else
                kill_conn(k, ep, 0);
            return;
        }
    }
    ERR_print_errors_fp(stderr);
    SSL_free(s);
    close(c);
    if (p >= 0)
        close(p);
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: refsplice LISTEN_PORT COMPUTE_PORT CERT KEY READAHEAD\n");
        return 2;
    }
    int lport = atoi(argv[1]), compute_port = atoi(argv[2]), readahead = atoi(argv[5]);
    signal(SIGPIPE, SIG_IGN); /* OpenSSL writes with write(2): a gone peer must not kill us */
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx || SSL_CTX_use_certificate_chain_file(ctx, argv[3]) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, argv[4], SSL_FILETYPE_PEM) != 1) {
        ERR_print_errors_fp(stderr);
        return 1;
    }
    SSL_CTX_set_options(ctx, SSL_OP_NO_TICKET);
    SSL_CTX_set_num_tickets(ctx, 0);
    SSL_CTX_set_read_ahead(ctx, readahead);
    int ls = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)lport)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (ls < 0 || bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 128)) {
        perror("listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event lev = {.events = EPOLLIN, .data.u64 = 0};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &lev);
    printf("ready\n");
    fflush(stdout);
    struct epoll_event evs[64];
    for (;;) {
        int n = epoll_wait(ep, evs, 64, -1);
        for (int i = 0; i < n; i++) {
            uint64_t tag = evs[i].data.u64;
            if (!tag) {
                accept_one(ls, ep, ctx, compute_port);
                continue;
            }
            conn *k = (conn *)(uintptr_t)(tag & ~(uint64_t)1);
            if (k->dead)
                continue; /* its other fd died earlier in this batch */
            if (tag & 1)
                from_compute(k, ep);
            else
                from_client(k, ep);
        }
        while (graveyard) {
            conn *k = graveyard;
            graveyard = k->next_dead;
            SSL_free(k->ssl);
            free(k);
        }
    }
}
