/* Server TLS for the native data plane: one SSL_CTX per certificate, chosen by
 * SNI with tls/sni.py's rules, set up like tls/context.py (TLS 1.2 minimum, no
 * renegotiation, ALPN "postgresql" when offered) plus what PostgreSQL itself
 * does (no session tickets, no session cache) and what keeps an idle session
 * small (SSL_MODE_RELEASE_BUFFERS). */
#ifndef PGW_TLS_NATIVE_H
#define PGW_TLS_NATIVE_H

#include <stddef.h>
#include <stdint.h>
#include <openssl/ssl.h>

/* An immutable certificate set. Reference counted: the engine holds one
 * reference, each handshake in progress another, so a hot reload (a new
 * table) never changes a handshake that already started. */
typedef struct pgw_tls_table pgw_tls_table;

typedef struct {
    const char *name;   /* normalised (lower-case, no trailing dot) */
    int index;
} pgw_tls_name;

/* Builds a table from `n` (cert file, key file) pairs (index 0 is the default)
 * and the exact / wildcard-suffix name maps. NULL with a message in `err` when a
 * file cannot be loaded or an index is out of range. */
pgw_tls_table *pgw_tls_table_new(const char *const *cert_files, const char *const *key_files,
                                 size_t n, const pgw_tls_name *exact, size_t n_exact,
                                 const pgw_tls_name *wildcard, size_t n_wildcard,
                                 char *err, size_t errlen);
void pgw_tls_table_ref(pgw_tls_table *t);
void pgw_tls_table_unref(pgw_tls_table *t);

/* A TLS 1.3 connection's first application traffic secrets, caught during
 * the handshake for tls_records.c (which then replaces the SSL object). */
typedef struct {
    uint8_t client[48], server[48];
    size_t len;
    unsigned have; /* 1: client's, 2: server's */
} pgw_tls_secrets;

/* What the SNI callback chose, kept by the caller for the READY event, and the
 * traffic secrets (malloc'd, only during a TLS 1.3 handshake). */
typedef struct {
    int cert_index;        /* -1 until the callback ran */
    char *server_name;     /* malloc'd copy of the client's SNI as sent, or NULL */
    int failed;            /* the callback refused the name (not ASCII, too long) */
    pgw_tls_secrets *secrets;
} pgw_tls_choice;

/* Frees what `choice` holds (the secrets wiped first). */
void pgw_tls_choice_clear(pgw_tls_choice *choice);

/* A server SSL for a handshake on `fd` using table `t`; `choice` receives the
 * SNI decision and the traffic secrets (it must outlive the handshake). Its
 * read-ahead is off, so the handshake reads no byte past the client's
 * Finished; NULL on failure. */
SSL *pgw_tls_new_ssl(pgw_tls_table *t, int fd, pgw_tls_choice *choice);

/* The index `name` maps to (exact, then wildcard suffix, then 0): exposed so the
 * tests can compare it with tls/sni.py. `name` may be NULL. */
int pgw_tls_select(const pgw_tls_table *t, const char *name);

/* Normalise a host name as tls/sni.py does (ASCII lower-case, trailing dots
 * removed) into `out` (size `outlen`); -1 when it does not fit or holds a byte
 * outside printable ASCII. */
int pgw_tls_normalise(const char *name, char *out, size_t outlen);

#endif
