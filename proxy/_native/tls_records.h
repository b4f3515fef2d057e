/* TLS 1.3 records after the handshake, without OpenSSL's SSL object.
 *
 * OpenSSL does the handshake; then, as kernel TLS offload does (this kernel
 * has none), the connection's traffic secrets move here and the SSL object is
 * freed: an OpenSSL 3.0 server SSL holds ~14 KB per connection for as long as
 * it lives, this holds the keys (~0.2 KB) and two cipher contexts. Records are
 * sealed and opened with libcrypto's AEADs (AES-GCM, ChaCha20-Poly1305); what
 * TLS 1.3 allows after the handshake is handled as RFC 8446 says: KeyUpdate
 * both ways (and one of ours before a key wears out), alerts, close_notify.
 * TLS 1.2 connections, and TLS 1.3 with a cipher not listed here, stay with
 * OpenSSL.
 *
 * Sans-IO: the caller moves bytes; these functions only turn records into
 * plaintext and back, so the fuzzer drives them exactly as the engine does. */
#ifndef PGW_TLS_RECORDS_H
#define PGW_TLS_RECORDS_H

#include <stddef.h>
#include <stdint.h>

#include <openssl/ssl.h>

#include "tls_native.h"

#define PGW_TLS13_HEADER 5
#define PGW_TLS13_MAX_PLAIN 16384
/* The longest record a peer may send (RFC 8446 §5.2: plaintext + 256). */
#define PGW_TLS13_MAX_RECORD (PGW_TLS13_HEADER + PGW_TLS13_MAX_PLAIN + 256)
/* Header, inner content type, AEAD tag. */
#define PGW_TLS13_OVERHEAD (PGW_TLS13_HEADER + 1 + 16)
/* Enough to seal two full records at once. */
#define PGW_TLS13_SEAL_BUFFER (2 * (PGW_TLS13_MAX_PLAIN + PGW_TLS13_OVERHEAD))

typedef struct pgw_tls13 pgw_tls13;

enum { PGW_TLS13_OK = 0, PGW_TLS13_CLOSED = 1, PGW_TLS13_FAILED = 2 };

/* Takes over a server connection whose TLS 1.3 handshake just finished, from
 * the traffic secrets `choice` caught (tls_native.c's keylog callback); the
 * caller then frees `ssl`. NULL when it stays with OpenSSL: TLS 1.2, another
 * cipher, secrets missing, or bytes OpenSSL read and did not hand out. */
pgw_tls13 *pgw_tls13_take(SSL *ssl, pgw_tls_choice *choice);

/* A record layer with these secrets (hash-sized), for a cipher suite id
 * (TLS1_3_CK_*): the reading side's and the writing side's. NULL when the
 * cipher is not supported or libcrypto fails. */
pgw_tls13 *pgw_tls13_new(unsigned long cipher_id, const uint8_t *read_secret,
                         const uint8_t *write_secret, size_t secret_len);
void pgw_tls13_free(pgw_tls13 *t);

/* Opens the whole records in buf[0, len) in place: their application data
 * ends up packed at buf[0, *plain); *used is how much of buf was whole
 * records (the rest, a partial record, is to be given again with more). A
 * KeyUpdate is applied; alerts and errors end it: CLOSED after close_notify,
 * FAILED with pgw_tls13_error() and, when one is owed, pgw_tls13_alert_owed().
 * Plaintext opened before the end is still in *plain. */
int pgw_tls13_open(pgw_tls13 *t, uint8_t *buf, size_t len, size_t *used, size_t *plain);

/* Seals p[0, n) as application-data records into out[0, cap), preceded by a
 * KeyUpdate when one is owed (the peer asked, or the write key is worn out).
 * Returns how much of p was sealed (whole records only), *outlen the bytes to
 * send. *outlen == 0 with something to do means failure (pgw_tls13_error). */
size_t pgw_tls13_seal(pgw_tls13 *t, const uint8_t *p, size_t n, uint8_t *out, size_t cap,
                      size_t *outlen);
/* 1 when a seal is owed even with no data (a KeyUpdate the peer asked for). */
int pgw_tls13_update_owed(const pgw_tls13 *t);
/* Seals an alert (close_notify is a warning, the rest fatal) into out (≥ 32
 * bytes); returns its length, 0 on failure. */
size_t pgw_tls13_alert(pgw_tls13 *t, uint8_t description, uint8_t *out, size_t cap);
/* The alert an open failure owes the peer (0: none, e.g. the peer's own alert). */
uint8_t pgw_tls13_alert_owed(const pgw_tls13 *t);
const char *pgw_tls13_error(const pgw_tls13 *t);

#endif
