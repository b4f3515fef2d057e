/* Server TLS for the native data plane (see tls_native.h). */
#include "tls_native.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>

/* The longest host name DNS allows; an SNI past it matches nothing. */
#define PGW_MAX_NAME 253

struct pgw_tls_table {
    atomic_int refs;
    SSL_CTX *front;         /* no certificate: the SNI callback always switches */
    SSL_CTX **ctx;          /* one per certificate, index 0 the default */
    size_t n_ctx;
    pgw_tls_name *exact;    /* sorted by name */
    size_t n_exact;
    pgw_tls_name *wildcard; /* sorted by suffix */
    size_t n_wildcard;
};

static const unsigned char ALPN_POSTGRESQL[] = "\x0apostgresql";

static void put_ssl_error(char *err, size_t errlen, const char *what, const char *file) {
    unsigned long code = ERR_peek_last_error();
    char reason[160];
    if (code)
        ERR_error_string_n(code, reason, sizeof reason);
    else
        snprintf(reason, sizeof reason, "unknown error");
    snprintf(err, errlen, "%s %s: %s", what, file ? file : "", reason);
    ERR_clear_error();
}

/* ALPN: "postgresql" when the client offers it; otherwise no ALPN at all (the
 * Python path's ssl module does the same), and the caller decides. */
static int on_alpn(SSL *ssl, const unsigned char **out, unsigned char *outlen,
                   const unsigned char *in, unsigned int inlen, void *arg) {
    (void)ssl;
    (void)arg;
    unsigned char *selected = NULL;
    unsigned char selected_len = 0;
    if (SSL_select_next_proto(&selected, &selected_len, ALPN_POSTGRESQL,
                              sizeof ALPN_POSTGRESQL - 1, in, inlen) != OPENSSL_NPN_NEGOTIATED)
        return SSL_TLSEXT_ERR_NOACK;
    *out = selected;
    *outlen = selected_len;
    return SSL_TLSEXT_ERR_OK;
}

int pgw_tls_normalise(const char *name, char *out, size_t outlen) {
    size_t n = strlen(name);
    while (n && name[n - 1] == '.')
        n--;
    if (n >= outlen)
        return -1;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)name[i];
        if (ch < 0x21 || ch > 0x7e)
            return -1;
        out[i] = (ch >= 'A' && ch <= 'Z') ? (char)(ch + 32) : (char)ch;
    }
    out[n] = 0;
    return 0;
}

static int name_cmp(const void *a, const void *b) {
    return strcmp(((const pgw_tls_name *)a)->name, ((const pgw_tls_name *)b)->name);
}

static int lookup(const pgw_tls_name *names, size_t n, const char *name) {
    pgw_tls_name key = {name, 0};
    const pgw_tls_name *hit = bsearch(&key, names, n, sizeof key, name_cmp);
    return hit ? hit->index : -1;
}

int pgw_tls_select(const pgw_tls_table *t, const char *name) {
    char norm[PGW_MAX_NAME + 1];
    if (!name || pgw_tls_normalise(name, norm, sizeof norm) < 0)
        return 0;
    int hit = lookup(t->exact, t->n_exact, norm);
    if (hit >= 0)
        return hit;
    /* A wildcard covers exactly one non-empty first label, never a name with "*". */
    const char *dot = strchr(norm, '.');
    if (dot && dot != norm && !strchr(norm, '*')) {
        hit = lookup(t->wildcard, t->n_wildcard, dot + 1);
        if (hit >= 0)
            return hit;
    }
    return 0;
}

/* Runs for every ClientHello (with or without SNI): picks the certificate's
 * context and records the choice for the READY event. */
static int on_server_name(SSL *ssl, int *alert, void *arg) {
    pgw_tls_table *t = arg;
    pgw_tls_choice *choice = SSL_get_app_data(ssl);
    const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    char norm[PGW_MAX_NAME + 1];
    if (name && pgw_tls_normalise(name, norm, sizeof norm) < 0) {
        /* The Python path cannot decode such a name either and fails the handshake. */
        choice->failed = 1;
        *alert = SSL_AD_UNRECOGNIZED_NAME;
        return SSL_TLSEXT_ERR_ALERT_FATAL;
    }
    int index = pgw_tls_select(t, name);
    if (name && !choice->server_name) {
        choice->server_name = strdup(name);
        if (!choice->server_name) {
            *alert = SSL_AD_INTERNAL_ERROR;
            return SSL_TLSEXT_ERR_ALERT_FATAL;
        }
    }
    choice->cert_index = index;
    if (SSL_set_SSL_CTX(ssl, t->ctx[index]) == NULL) {
        *alert = SSL_AD_INTERNAL_ERROR;
        return SSL_TLSEXT_ERR_ALERT_FATAL;
    }
    return SSL_TLSEXT_ERR_OK;
}

static int unhex(char ch) {
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

/* OpenSSL hands each secret out as an NSS key-log line: "LABEL <client
 * random> <secret>", in hex. Only the first application traffic secrets are
 * kept; a line that does not parse leaves the connection with OpenSSL. */
static void on_keylog(const SSL *ssl, const char *line) {
    static const char CLIENT[] = "CLIENT_TRAFFIC_SECRET_0 ", SERVER[] = "SERVER_TRAFFIC_SECRET_0 ";
    pgw_tls_choice *choice = SSL_get_app_data(ssl);
    unsigned bit = !strncmp(line, CLIENT, sizeof CLIENT - 1)   ? 1
                   : !strncmp(line, SERVER, sizeof SERVER - 1) ? 2
                                                               : 0;
    if (!bit || !choice)
        return;
    const char *hex = strrchr(line, ' ') + 1;
    size_t n = strlen(hex) / 2;
    if (strlen(hex) % 2 || !n || n > sizeof choice->secrets->client)
        return;
    if (!choice->secrets && !(choice->secrets = calloc(1, sizeof *choice->secrets)))
        return;
    pgw_tls_secrets *s = choice->secrets;
    if (s->have && s->len != n)
        return;
    uint8_t *out = bit == 1 ? s->client : s->server;
    for (size_t i = 0; i < n; i++) {
        int hi = unhex(hex[2 * i]), lo = unhex(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            s->have = 0; /* unusable: never half a secret */
            return;
        }
        out[i] = (uint8_t)(hi << 4 | lo);
    }
    s->len = n;
    s->have |= bit;
}

void pgw_tls_choice_clear(pgw_tls_choice *choice) {
    free(choice->server_name);
    choice->server_name = NULL;
    if (choice->secrets) {
        OPENSSL_cleanse(choice->secrets, sizeof *choice->secrets);
        free(choice->secrets);
        choice->secrets = NULL;
    }
}

/* The settings every context gets: after the SNI switch OpenSSL takes some of
 * them (ALPN) from the new context and others (options, tickets) from the first. */
static SSL_CTX *server_context(char *err, size_t errlen) {
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (!ctx) {
        put_ssl_error(err, errlen, "SSL_CTX_new", NULL);
        return NULL;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    /* Renegotiation is a DoS vector (PostgreSQL and tls/context.py disable it);
     * tickets and the session cache are off as in PostgreSQL; an abrupt TCP
     * close reads as EOF, as asyncio's ssl does. */
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_TICKET |
                                 SSL_OP_IGNORE_UNEXPECTED_EOF | SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_num_tickets(ctx, 0);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    /* RELEASE_BUFFERS: an idle session holds no record buffers. The write
     * buffer may move (the retry comes from the connection's queue). */
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS | SSL_MODE_ENABLE_PARTIAL_WRITE |
                              SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    /* The traffic secrets, for the record layer that replaces OpenSSL's
     * after the handshake (tls_records.h); they never leave the process. */
    SSL_CTX_set_keylog_callback(ctx, on_keylog);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    SSL_CTX_set_alpn_select_cb(ctx, on_alpn, NULL);
    return ctx;
}

static void table_free(pgw_tls_table *t) {
    if (t->front)
        SSL_CTX_free(t->front);
    for (size_t i = 0; i < t->n_ctx; i++)
        if (t->ctx[i])
            SSL_CTX_free(t->ctx[i]);
    free(t->ctx);
    for (size_t i = 0; i < t->n_exact; i++)
        free((char *)t->exact[i].name);
    for (size_t i = 0; i < t->n_wildcard; i++)
        free((char *)t->wildcard[i].name);
    free(t->exact);
    free(t->wildcard);
    free(t);
}

static int copy_names(pgw_tls_name **out, size_t *n_out, const pgw_tls_name *in, size_t n,
                      size_t n_ctx, char *err, size_t errlen) {
    *out = calloc(n ? n : 1, sizeof **out);
    if (!*out) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    for (size_t i = 0; i < n; i++) {
        if (in[i].index < 0 || (size_t)in[i].index >= n_ctx) {
            snprintf(err, errlen, "certificate index %d out of range for %s", in[i].index,
                     in[i].name);
            return -1;
        }
        char norm[PGW_MAX_NAME + 1];
        if (pgw_tls_normalise(in[i].name, norm, sizeof norm) < 0) {
            snprintf(err, errlen, "invalid certificate name %.64s", in[i].name);
            return -1;
        }
        (*out)[i].name = strdup(norm);
        (*out)[i].index = in[i].index;
        (*n_out)++;
        if (!(*out)[i].name) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
    }
    qsort(*out, n, sizeof **out, name_cmp);
    return 0;
}

pgw_tls_table *pgw_tls_table_new(const char *const *cert_files, const char *const *key_files,
                                 size_t n, const pgw_tls_name *exact, size_t n_exact,
                                 const pgw_tls_name *wildcard, size_t n_wildcard,
                                 char *err, size_t errlen) {
    if (!n) {
        snprintf(err, errlen, "at least one certificate is needed");
        return NULL;
    }
    pgw_tls_table *t = calloc(1, sizeof *t);
    if (!t || !(t->ctx = calloc(n, sizeof *t->ctx))) {
        free(t);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    atomic_init(&t->refs, 1);
    for (size_t i = 0; i < n; i++) {
        SSL_CTX *ctx = server_context(err, errlen);
        if (!ctx)
            goto fail;
        t->ctx[i] = ctx;
        t->n_ctx++;
        if (SSL_CTX_use_certificate_chain_file(ctx, cert_files[i]) != 1) {
            put_ssl_error(err, errlen, "cannot load certificate", cert_files[i]);
            goto fail;
        }
        if (SSL_CTX_use_PrivateKey_file(ctx, key_files[i], SSL_FILETYPE_PEM) != 1) {
            put_ssl_error(err, errlen, "cannot load key", key_files[i]);
            goto fail;
        }
        if (SSL_CTX_check_private_key(ctx) != 1) {
            put_ssl_error(err, errlen, "key does not match certificate", cert_files[i]);
            goto fail;
        }
    }
    if (copy_names(&t->exact, &t->n_exact, exact, n_exact, n, err, errlen) < 0 ||
        copy_names(&t->wildcard, &t->n_wildcard, wildcard, n_wildcard, n, err, errlen) < 0)
        goto fail;
    t->front = server_context(err, errlen);
    if (!t->front)
        goto fail;
    SSL_CTX_set_tlsext_servername_callback(t->front, on_server_name);
    SSL_CTX_set_tlsext_servername_arg(t->front, t);
    return t;
fail:
    table_free(t);
    return NULL;
}

void pgw_tls_table_ref(pgw_tls_table *t) { atomic_fetch_add(&t->refs, 1); }

void pgw_tls_table_unref(pgw_tls_table *t) {
    if (t && atomic_fetch_sub(&t->refs, 1) == 1)
        table_free(t);
}

SSL *pgw_tls_new_ssl(pgw_tls_table *t, int fd, pgw_tls_choice *choice) {
    SSL *ssl = SSL_new(t->front);
    if (!ssl)
        return NULL;
    if (SSL_set_fd(ssl, fd) != 1) {
        SSL_free(ssl);
        return NULL;
    }
    choice->cert_index = -1;
    choice->server_name = NULL;
    choice->failed = 0;
    choice->secrets = NULL;
    SSL_set_app_data(ssl, choice);
    SSL_set_read_ahead(ssl, 0);
    SSL_set_accept_state(ssl);
    return ssl;
}
