/* libFuzzer harness for TLS record edge cases on the server side of the native
 * data plane: a server SSL built by the engine's own code (tls_native.c's table
 * and pgw_tls_new_ssl), on memory BIOs, its plaintext
 * read into one fixed buffer and fed to the frontend tracker, as the engine does.
 *
 *   clang-14 -g -O1 -fsanitize=fuzzer,address,undefined -I.. \
 *       fuzz_tls.c ../tls_native.c ../tls_records.c ../tracker.c -lssl -lcrypto
 *   .venv/bin/python -m tests.native.test_fuzz seeds   # (from the repository root)
 *   ASAN_OPTIONS=quarantine_size_mb=16 ./a.out -len_control=0 -max_len=2048 seeds/tls
 * tests/native/test_fuzz.py builds and runs it for 15 s in the test suite.
 *
 * OpenSSL itself is the system's, not instrumented: libFuzzer's guidance comes
 * from this harness, tls_native.c and tracker.c, while the inputs still reach
 * OpenSSL's record layer and handshake parsing.
 *
 * Input: byte 0 is the mode. Mode % 4 == 0: the rest goes to a fresh server as
 * raw client bytes (ClientHello and record-layer parsing, the SNI and ALPN
 * callbacks), in pieces whose sizes come from byte 1. Otherwise a real OpenSSL
 * client (TLS 1.2 or 1.3, SNI and ALPN chosen by the mode) talks to the server
 * and the rest of the input is a list of operations: client handshake steps and
 * writes (small, and queries large enough to span records), moving the
 * client's ciphertext in any fragment sizes, corrupting a byte of it,
 * injecting raw bytes between records, key updates, renegotiation attempts
 * (refused), close_notify, and server writes (so buffers are released and
 * re-taken both ways).
 *
 * Checked after every operation: whatever the server decrypts is exactly the
 * next part of what the client wrote (nothing forged, lost or reordered, even
 * after tampering), and in a clean exchange all of it arrives. At the end the
 * frontend tracker fed in SSL_read pieces agrees with one fed everything at
 * once. ASan/UBSan and libFuzzer's leak check cover memory. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "tls_native.h"
#include "tls_records.h"
#include "tracker.h"

#define MAX_OPS 96
/* The engine reads a TLS record's plaintext into a fixed per-thread buffer. */
#define PLAIN_BUF 16384
/* ... and, with its own TLS 1.3 records, reads ciphertext into one of these. */
#define RECORD_BUF (64 * 1024)

static struct {
    pgw_tls_table *table;
    SSL_CTX *client[2]; /* TLS 1.2 only, TLS 1.3 only */
} G;

static uint8_t plain[PLAIN_BUF];
static uint8_t records[RECORD_BUF];
static uint8_t sealed[PGW_TLS13_SEAL_BUFFER];

static void check(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "fuzz_tls: %s\n", what);
        abort();
    }
}

/* ---- one-time set-up: a throw-away certificate, the contexts ---- */

static void make_cert(EVP_PKEY **key_out, X509 **cert_out, const char *cn)
{
    EVP_PKEY *key = EVP_EC_gen("P-256");
    X509 *cert = X509_new();
    check(key && cert, "key/cert");
    X509_set_version(cert, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(cert), 1);
    X509_gmtime_adj(X509_getm_notBefore(cert), -60);
    X509_gmtime_adj(X509_getm_notAfter(cert), 86400);
    X509_set_pubkey(cert, key);
    X509_NAME *name = X509_get_subject_name(cert);
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1, -1, 0);
    X509_set_issuer_name(cert, name);
    check(X509_sign(cert, key, EVP_sha256()) > 0, "X509_sign");
    *key_out = key;
    *cert_out = cert;
}

static void write_pem(const char *path, EVP_PKEY *key, X509 *cert)
{
    FILE *f = fopen(path, "w");
    check(f != NULL, "fopen");
    check(key ? PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL)
              : PEM_write_X509(f, cert),
          "PEM_write");
    fclose(f);
}

static void setup_server(void)
{
    /* Two certificates (default, and one chosen by exact name or wildcard),
     * loaded from files as the engine loads them, then the files go. */
    char dir[] = "/tmp/fuzz_tls.XXXXXX";
    check(mkdtemp(dir) != NULL, "mkdtemp");
    char certs[2][64], keys[2][64];
    const char *cert_files[2], *key_files[2];
    for (int i = 0; i < 2; i++) {
        EVP_PKEY *key;
        X509 *cert;
        make_cert(&key, &cert, i ? "db.example.com" : "default");
        snprintf(certs[i], sizeof certs[i], "%s/cert%d.pem", dir, i);
        snprintf(keys[i], sizeof keys[i], "%s/key%d.pem", dir, i);
        write_pem(certs[i], NULL, cert);
        write_pem(keys[i], key, NULL);
        cert_files[i] = certs[i];
        key_files[i] = keys[i];
        EVP_PKEY_free(key);
        X509_free(cert);
    }
    pgw_tls_name exact[] = {{"db.example.com", 1}};
    pgw_tls_name wildcard[] = {{"example.org", 1}};
    char err[256] = "";
    G.table = pgw_tls_table_new(cert_files, key_files, 2, exact, 1, wildcard, 1, err, sizeof err);
    if (!G.table)
        fprintf(stderr, "fuzz_tls: %s\n", err);
    check(G.table != NULL, "pgw_tls_table_new");
    for (int i = 0; i < 2; i++) {
        unlink(certs[i]);
        unlink(keys[i]);
    }
    rmdir(dir);
}

static SSL *new_server(pgw_tls_choice *choice)
{
    /* fd -1: its socket BIO is replaced by memory BIOs below. */
    return pgw_tls_new_ssl(G.table, -1, choice);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    setup_server();
    for (int i = 0; i < 2; i++) {
        SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
        check(ctx != NULL, "client ctx");
        int version = i ? TLS1_3_VERSION : TLS1_2_VERSION;
        SSL_CTX_set_min_proto_version(ctx, version);
        SSL_CTX_set_max_proto_version(ctx, version);
        SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
        SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
        G.client[i] = ctx;
    }
    return 0;
}

/* ---- the input, read from the front ---- */

typedef struct {
    const uint8_t *p;
    size_t n;
} input;

static unsigned take_byte(input *in)
{
    if (!in->n)
        return 0;
    in->n--;
    return *in->p++;
}

static const uint8_t *take(input *in, size_t *len)
{
    if (*len > in->n)
        *len = in->n;
    const uint8_t *p = in->p;
    in->p += *len;
    in->n -= *len;
    return p;
}

/* ---- one connection ---- */

typedef struct {
    SSL *server, *client;
    pgw_tls13 *t13;     /* after a TLS 1.3 handshake: the engine's records, server freed */
    uint8_t *rin;       /* t13: a partial record kept between pumps */
    size_t rin_len;
    size_t sent, client_got; /* server plaintext written / decrypted by the client */
    BIO *to_server, *from_server;  /* the server's rbio / wbio */
    BIO *to_client, *from_client;  /* the client's rbio / wbio */
    pgw_tls_choice choice;
    int server_dead, server_eof;
    size_t read_size;
    pgw_frontend tracker;
    uint8_t *written;  /* everything the client wrote (plaintext) */
    size_t written_len, written_cap;
    size_t received;   /* how much of it the server has decrypted */
} conn;

static void memory_bios(SSL *ssl, BIO **rbio, BIO **wbio)
{
    *rbio = BIO_new(BIO_s_mem());
    *wbio = BIO_new(BIO_s_mem());
    check(*rbio && *wbio, "BIO_new");
    SSL_set_bio(ssl, *rbio, *wbio); /* the SSL owns them now */
}

static void received(conn *c, const uint8_t *p, size_t n)
{
    if (!n)
        return;
    check(c->received + n <= c->written_len, "server decrypted more than was sent");
    check(!memcmp(p, c->written + c->received, n), "server decrypted other bytes than were sent");
    c->received += n;
    pgw_frontend_feed(&c->tracker, p, n);
}

static void seal_to_client(conn *c, const uint8_t *p, size_t n)
{
    size_t len = 0;
    size_t took = pgw_tls13_seal(c->t13, p, n, sealed, sizeof sealed, &len);
    check(took == n && len > 0, "seal");
    check(BIO_write(c->from_server, sealed, (int)len) == (int)len, "BIO_write");
}

/* As the engine's t13_recv: a partial record kept, then one read of up to
 * read_size bytes after it, every whole record opened in place. */
static void t13_pump(conn *c)
{
    while (!c->server_dead && !c->server_eof) {
        size_t have = c->rin_len;
        memcpy(records, c->rin, have);
        size_t room = RECORD_BUF - have;
        int r = BIO_read(c->to_server, records + have, (int)(c->read_size < room ? c->read_size : room));
        if (r <= 0)
            break;
        have += (size_t)r;
        size_t used = 0, got = 0;
        int rc = pgw_tls13_open(c->t13, records, have, &used, &got);
        check(got <= used, "more plaintext than ciphertext");
        received(c, records, got);
        if (rc == PGW_TLS13_FAILED) {
            c->server_dead = 1;
            uint8_t owed = pgw_tls13_alert_owed(c->t13);
            size_t n = owed ? pgw_tls13_alert(c->t13, owed, sealed, sizeof sealed) : 0;
            if (n)
                check(BIO_write(c->from_server, sealed, (int)n) == (int)n, "BIO_write");
            break;
        }
        if (rc == PGW_TLS13_CLOSED) {
            c->server_eof = 1;
            break;
        }
        check(have - used < PGW_TLS13_MAX_RECORD, "a whole record left unopened");
        memmove(c->rin, records + used, have - used);
        c->rin_len = have - used;
        if (pgw_tls13_update_owed(c->t13))
            seal_to_client(c, NULL, 0);
    }
}

/* The engine's handshake: then, on TLS 1.3, its own records from here on
 * (the SSL freed, new memory BIOs for the ciphertext both ways). */
static void handshake_done(conn *c)
{
    if (!(c->t13 = pgw_tls13_take(c->server, &c->choice)))
        return;
    check(SSL_version(c->server) == TLS1_3_VERSION, "took a TLS 1.2 connection");
    BIO *in = BIO_new(BIO_s_mem()), *out = BIO_new(BIO_s_mem());
    check(in && out, "BIO_new");
    /* Whatever the client sent past its Finished is still unread. */
    uint8_t buf[4096];
    int r;
    while ((r = BIO_read(c->to_server, buf, sizeof buf)) > 0)
        check(BIO_write(in, buf, r) == r, "BIO_write");
    check(BIO_ctrl_pending(c->from_server) == 0, "the server's flight was not all sent");
    SSL_free(c->server);
    c->server = NULL;
    c->to_server = in;
    c->from_server = out;
    c->rin = malloc(PGW_TLS13_MAX_RECORD);
    check(c->rin != NULL, "malloc");
}

static int server_ready(const conn *c)
{
    return c->t13 || (c->server && SSL_is_init_finished(c->server));
}

/* The server side of the engine: read what there is into the fixed buffer,
 * feed the tracker, check it is the next part of what the client wrote. */
static void server_pump(conn *c)
{
    if (!c->t13 && !c->server_dead && !SSL_is_init_finished(c->server)) {
        int r = SSL_do_handshake(c->server);
        if (r == 1) {
            handshake_done(c);
        } else {
            int err = SSL_get_error(c->server, r);
            if (err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE)
                c->server_dead = 1;
        }
        ERR_clear_error();
        if (!server_ready(c))
            return;
    }
    if (c->t13) {
        t13_pump(c);
        return;
    }
    while (!c->server_dead && !c->server_eof) {
        int r = SSL_read(c->server, plain, (int)c->read_size);
        if (r > 0) {
            received(c, plain, (size_t)r);
            continue;
        }
        int err = SSL_get_error(c->server, r);
        if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE)
            break;
        if (err == SSL_ERROR_ZERO_RETURN)
            c->server_eof = 1;
        else
            c->server_dead = 1;
        ERR_clear_error();
    }
    ERR_clear_error();
}

static void move(BIO *from, BIO *to, size_t limit, int corrupt_at, uint8_t corrupt_with)
{
    uint8_t buf[4096];
    size_t moved = 0;
    while (moved < limit) {
        size_t want = limit - moved < sizeof buf ? limit - moved : sizeof buf;
        int r = BIO_read(from, buf, (int)want);
        if (r <= 0)
            break;
        if (corrupt_at >= 0 && (size_t)corrupt_at >= moved && (size_t)corrupt_at < moved + (size_t)r)
            buf[(size_t)corrupt_at - moved] ^= corrupt_with;
        check(BIO_write(to, buf, r) == r, "BIO_write");
        moved += (size_t)r;
    }
}

/* Server output to the client, which reads and drops it (alerts, tickets none). */
static void client_pump(conn *c)
{
    move(c->from_server, c->to_client, SIZE_MAX, -1, 0);
    int r;
    while ((r = SSL_read(c->client, plain, sizeof plain)) > 0)
        c->client_got += (size_t)r;
    ERR_clear_error();
}

static void client_write(conn *c, const uint8_t *data, size_t len)
{
    if (!len || !SSL_is_init_finished(c->client))
        return;
    size_t done = 0;
    while (done < len) {
        int r = SSL_write(c->client, data + done, (int)(len - done));
        if (r <= 0)
            break;
        /* Recorded only once sent: the server must see exactly these. */
        if (c->written_len + (size_t)r > c->written_cap) {
            size_t cap = (c->written_cap ? c->written_cap * 2 : 4096);
            while (cap < c->written_len + (size_t)r)
                cap *= 2;
            c->written = realloc(c->written, cap);
            check(c->written != NULL, "realloc");
            c->written_cap = cap;
        }
        memcpy(c->written + c->written_len, data + done, (size_t)r);
        c->written_len += (size_t)r;
        done += (size_t)r;
    }
    ERR_clear_error();
}

static void raw_mode(input *in, unsigned mode)
{
    /* Arbitrary client bytes, in pieces, at a fresh server. */
    pgw_tls_choice choice;
    SSL *server = new_server(&choice);
    check(server != NULL, "new_server");
    BIO *rbio, *wbio;
    memory_bios(server, &rbio, &wbio);
    pgw_frontend tracker;
    pgw_frontend_init(&tracker);
    size_t piece = 1 + take_byte(in) * ((mode >> 2) % 4 + 1);
    while (in->n) {
        size_t len = piece;
        const uint8_t *p = take(in, &len);
        check(BIO_write(rbio, p, (int)len) == (int)len, "BIO_write");
        int r = SSL_read(server, plain, sizeof plain);
        if (r > 0)
            pgw_frontend_feed(&tracker, plain, (size_t)r);
        int err = r > 0 ? SSL_ERROR_NONE : SSL_get_error(server, r);
        ERR_clear_error();
        (void)BIO_reset(wbio);
        if (err != SSL_ERROR_NONE && err != SSL_ERROR_WANT_READ && err != SSL_ERROR_WANT_WRITE)
            break;
    }
    SSL_free(server);
    pgw_tls_choice_clear(&choice);
    ERR_clear_error();
}

static const char *const SNI[] = {NULL, "db.example.com", "x.example.org", "DB.Example.COM.",
                                  "*.example.org", "", "bad name", "a.b.c.d.example.org"};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    input in = {data, size};
    unsigned mode = take_byte(&in);
    if ((mode & 3) == 0) {
        raw_mode(&in, mode);
        return 0;
    }
    static const size_t READ_SIZES[] = {PLAIN_BUF, 1, 5, 100, 4000, PLAIN_BUF, 16, PLAIN_BUF};
    conn c;
    memset(&c, 0, sizeof c);
    pgw_frontend_init(&c.tracker);
    c.read_size = READ_SIZES[(mode >> 2) & 7];
    int tls13 = (mode >> 5) & 1;
    c.server = new_server(&c.choice);
    check(c.server != NULL, "new_server");
    memory_bios(c.server, &c.to_server, &c.from_server);
    c.client = SSL_new(G.client[tls13]);
    check(c.client != NULL, "SSL_new client");
    memory_bios(c.client, &c.to_client, &c.from_client);
    SSL_set_connect_state(c.client);
    unsigned sni = take_byte(&in);
    if (SNI[sni & 7])
        SSL_set_tlsext_host_name(c.client, SNI[sni & 7]);
    if (mode & 0x40)
        SSL_set_alpn_protos(c.client, (const unsigned char *)"\x0apostgresql\x08http/1.1", 20);
    else if (mode & 0x80)
        SSL_set_alpn_protos(c.client, (const unsigned char *)"\x08http/1.1", 9);

    int clean = 1;
    for (int op = 0; op < MAX_OPS && in.n; op++) {
        unsigned code = take_byte(&in);
        switch (code % 10) {
        case 0: /* a client step: the handshake, or a write of input bytes */
            if (!SSL_is_init_finished(c.client)) {
                (void)SSL_do_handshake(c.client);
                ERR_clear_error();
            } else {
                size_t len = take_byte(&in);
                const uint8_t *p = take(&in, &len);
                client_write(&c, p, len);
            }
            break;
        case 1: /* some of the client's ciphertext: records split anywhere */
            move(c.from_client, c.to_server, 1 + take_byte(&in), -1, 0);
            server_pump(&c);
            client_pump(&c);
            break;
        case 2:
            move(c.from_client, c.to_server, SIZE_MAX, -1, 0);
            server_pump(&c);
            client_pump(&c);
            break;
        case 3: { /* one byte of the ciphertext changed */
            int at = (int)take_byte(&in);
            uint8_t with = (uint8_t)(take_byte(&in) | 1);
            if (BIO_ctrl_pending(c.from_client) > (size_t)at)
                clean = 0;
            move(c.from_client, c.to_server, SIZE_MAX, at, with);
            server_pump(&c);
            client_pump(&c);
            break;
        }
        case 4: { /* raw bytes between (or inside) records */
            size_t len = take_byte(&in) % 64;
            const uint8_t *p = take(&in, &len);
            if (len) {
                clean = 0;
                check(BIO_write(c.to_server, p, (int)len) == (int)len, "BIO_write");
                server_pump(&c);
                client_pump(&c);
            }
            break;
        }
        case 5: /* TLS 1.3 key update; TLS 1.2 renegotiation (refused) */
            if (SSL_is_init_finished(c.client)) {
                if (tls13) {
                    (void)SSL_key_update(c.client, SSL_KEY_UPDATE_REQUESTED);
                } else {
                    clean = 0;
                    (void)SSL_renegotiate(c.client);
                }
                (void)SSL_do_handshake(c.client);
                ERR_clear_error();
            }
            break;
        case 6: /* close_notify */
            clean = 0;
            (void)SSL_shutdown(c.client);
            ERR_clear_error();
            break;
        case 7: /* the server answers (its write buffer taken and released) */
            if (!c.server_dead && !c.server_eof && server_ready(&c)) {
                static const uint8_t ready[] = {'Z', 0, 0, 0, 5, 'I'};
                if (c.t13)
                    seal_to_client(&c, ready, sizeof ready);
                else if (SSL_write(c.server, ready, sizeof ready) != (int)sizeof ready)
                    break;
                c.sent += sizeof ready;
                ERR_clear_error();
                client_pump(&c);
            }
            break;
        case 8: { /* a Query spanning several records */
            size_t body = 1 + (size_t)take_byte(&in) * 256;
            uint8_t *q = malloc(body + 5);
            check(q != NULL, "malloc");
            q[0] = 'Q';
            q[1] = (uint8_t)((body + 4) >> 24);
            q[2] = (uint8_t)((body + 4) >> 16);
            q[3] = (uint8_t)((body + 4) >> 8);
            q[4] = (uint8_t)(body + 4);
            memset(q + 5, 'x', body - 1);
            q[body + 4] = 0;
            client_write(&c, q, body + 5);
            free(q);
            break;
        }
        default: /* the client reads what the server sent */
            client_pump(&c);
            break;
        }
    }
    /* Everything still in flight arrives; in a clean exchange, all of it. */
    for (int round = 0; round < 4; round++) {
        move(c.from_client, c.to_server, SIZE_MAX, -1, 0);
        server_pump(&c);
        client_pump(&c);
    }
    if (clean && server_ready(&c)) {
        check(!c.server_dead, "a clean exchange failed the server");
        check(c.received == c.written_len, "a clean exchange lost bytes");
        check(c.client_got == c.sent, "the client could not read all the server sent");
    }

    /* The tracker fed in SSL_read pieces agrees with one fed it all at once. */
    pgw_frontend whole;
    pgw_frontend_init(&whole);
    pgw_frontend_feed(&whole, c.written, c.received);
    check(whole.requests == c.tracker.requests, "tracker requests");
    check(whole.unsynced == c.tracker.unsynced, "tracker unsynced");
    check(whole.terminated == c.tracker.terminated, "tracker terminated");
    check(whole.f.broken == c.tracker.f.broken, "tracker broken");
    if (!whole.f.broken) {
        check(whole.f.last_type == c.tracker.f.last_type, "tracker last_type");
        check(pgw_at_boundary(&whole.f) == pgw_at_boundary(&c.tracker.f), "tracker boundary");
    }

    if (c.t13) { /* the memory BIOs are the harness's now */
        BIO_free(c.to_server);
        BIO_free(c.from_server);
    }
    SSL_free(c.server);
    SSL_free(c.client);
    pgw_tls13_free(c.t13);
    free(c.rin);
    pgw_tls_choice_clear(&c.choice);
    free(c.written);
    ERR_clear_error();
    return 0;
}
