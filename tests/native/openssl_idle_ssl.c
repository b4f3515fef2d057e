/* What one idle server-side SSL object costs in OpenSSL itself, set up as
 * proxy/_native/tls_native.c sets it up (a measurement, not a test): the
 * floor under the engine's per-connection memory with TLS.
 *
 *   gcc -O2 -o /tmp/openssl_idle_ssl tests/native/openssl_idle_ssl.c -lssl -lcrypto
 *   /tmp/openssl_idle_ssl CERT.pem KEY.pem          (TLS 1.3)
 *   /tmp/openssl_idle_ssl CERT.pem KEY.pem 1.2      (TLS 1.2)
 *
 * A client and a server SSL handshake over a socketpair and exchange a few
 * bytes; the server's allocations still live once the client is freed are
 * listed (the larger ones) and summed (malloc_usable_size + 8 each). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/ssl.h>

#define MAX_ALLOCS 100000

static struct {
    void *p;
    size_t n;
    const char *file;
    int line;
} allocs[MAX_ALLOCS];
static int n_allocs, tracing;

static void note(void *p, size_t n, const char *file, int line) {
    if (tracing && p && n_allocs < MAX_ALLOCS) {
        allocs[n_allocs].p = p;
        allocs[n_allocs].n = n;
        allocs[n_allocs].file = file;
        allocs[n_allocs].line = line;
        n_allocs++;
    }
}

static void forget(void *p) {
    for (int i = 0; i < n_allocs; i++)
        if (allocs[i].p == p)
            allocs[i].p = NULL;
}

static void *on_malloc(size_t n, const char *file, int line) {
    void *p = malloc(n);
    note(p, n, file, line);
    return p;
}

static void *on_realloc(void *p, size_t n, const char *file, int line) {
    if (p)
        forget(p);
    void *q = realloc(p, n);
    note(q, n, file, line);
    return q;
}

static void on_free(void *p, const char *file, int line) {
    (void)file;
    (void)line;
    if (p)
        forget(p);
    free(p);
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s CERT KEY [1.2]\n", argv[0]);
        return 2;
    }
    CRYPTO_set_mem_functions(on_malloc, on_realloc, on_free);
    SSL_CTX *server = SSL_CTX_new(TLS_server_method());
    SSL_CTX_set_min_proto_version(server, TLS1_2_VERSION);
    if (argc > 3)
        SSL_CTX_set_max_proto_version(server, TLS1_2_VERSION);
    SSL_CTX_set_options(server, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_TICKET |
                                    SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_num_tickets(server, 0);
    SSL_CTX_set_session_cache_mode(server, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_mode(server, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ENABLE_PARTIAL_WRITE |
                                 SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_read_ahead(server, 1);
    if (SSL_CTX_use_certificate_chain_file(server, argv[1]) != 1 ||
        SSL_CTX_use_PrivateKey_file(server, argv[2], SSL_FILETYPE_PEM) != 1) {
        fprintf(stderr, "cannot load %s / %s\n", argv[1], argv[2]);
        return 1;
    }
    SSL_CTX *client = SSL_CTX_new(TLS_client_method());
    for (int round = 0; round < 2; round++) { /* the first one warms OpenSSL's caches */
        n_allocs = 0;
        int sp[2];
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sp) < 0)
            return 1;
        fcntl(sp[0], F_SETFL, O_NONBLOCK);
        fcntl(sp[1], F_SETFL, O_NONBLOCK);
        SSL *cl = SSL_new(client);
        SSL_set_fd(cl, sp[1]);
        SSL_set_connect_state(cl);
        tracing = 1;
        SSL *sv = SSL_new(server);
        SSL_set_fd(sv, sp[0]);
        SSL_set_accept_state(sv);
        tracing = 0;
        for (int i = 0; i < 50; i++) {
            SSL_do_handshake(cl);
            tracing = 1;
            SSL_do_handshake(sv);
            tracing = 0;
        }
        char buf[64];
        size_t n;
        SSL_write_ex(cl, "hello", 5, &n);
        tracing = 1;
        SSL_read_ex(sv, buf, sizeof buf, &n);
        SSL_write_ex(sv, "hello", 5, &n);
        tracing = 0;
        SSL_read_ex(cl, buf, sizeof buf, &n);
        tracing = 1;
        SSL_read_ex(sv, buf, sizeof buf, &n); /* nothing more: idle */
        tracing = 0;
        SSL_free(cl);
        if (round == 1) {
            size_t total = 0;
            int live = 0;
            for (int i = 0; i < n_allocs; i++) {
                if (!allocs[i].p)
                    continue;
                live++;
                total += malloc_usable_size(allocs[i].p) + 8;
                if (allocs[i].n >= 128)
                    printf("%6zu %s:%d\n", allocs[i].n, allocs[i].file, allocs[i].line);
            }
            printf("%s: %d live allocations, %zu bytes\n", SSL_get_version(sv), live, total);
        }
        SSL_free(sv);
        close(sp[0]);
        close(sp[1]);
    }
    SSL_CTX_free(client);
    SSL_CTX_free(server);
    return 0;
}
