/* TLS 1.3 records after the handshake (see tls_records.h). RFC 8446 §5
 * (records), §7.1-7.3 (key schedule, traffic keys, updates), §4.6.3 (KeyUpdate),
 * §6 (alerts). */
#include "tls_records.h"

#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>

/* Content types and alerts used here. */
enum { CT_ALERT = 21, CT_HANDSHAKE = 22, CT_APPLICATION = 23 };
enum {
    AL_CLOSE_NOTIFY = 0,
    AL_UNEXPECTED_MESSAGE = 10,
    AL_BAD_RECORD_MAC = 20,
    AL_RECORD_OVERFLOW = 22,
    AL_ILLEGAL_PARAMETER = 47,
    AL_DECODE_ERROR = 50,
    AL_INTERNAL_ERROR = 80,
    AL_USER_CANCELED = 90,
};
enum { HS_KEY_UPDATE = 24 };

#define TAG_LEN 16
#define IV_LEN 12
#define MAX_SECRET 48
/* Records sealed under one write key before ours is replaced: AES-GCM's
 * margin is 2^24.5 full records (RFC 8446 §5.5); ChaCha20's is far above. */
#define KEY_RECORDS (UINT64_C(1) << 24)

typedef struct {
    EVP_CIPHER_CTX *ctx; /* keyed; the nonce is set per record */
    uint8_t secret[MAX_SECRET];
    uint8_t iv[IV_LEN];
    uint64_t seq;
} direction;

struct pgw_tls13 {
    const EVP_CIPHER *cipher;
    const char *digest;
    uint8_t hash_len, key_len;
    direction rd, wr;
    uint8_t hs[5]; /* a KeyUpdate arriving in pieces: the only handshake message allowed */
    uint8_t hs_len;
    uint8_t update_owed; /* the peer asked for our KeyUpdate */
    uint8_t closed;      /* close_notify arrived: nothing after it counts */
    uint8_t alert;       /* owed to the peer after a failure (0: none) */
    const char *error;
};

/* ---- the key schedule ---- */

/* HKDF-Expand-Label(secret, label, "", out_len) for out_len ≤ the hash size:
 * one HMAC block (RFC 8446 §7.1, RFC 5869 §2.3). */
static int expand_label(const pgw_tls13 *t, const uint8_t *secret, const char *label,
                        uint8_t *out, size_t out_len) {
    uint8_t info[2 + 1 + 6 + 16 + 1 + 1];
    size_t label_len = strlen(label);
    if (label_len > 16 || out_len > t->hash_len)
        return -1;
    size_t n = 0;
    info[n++] = (uint8_t)(out_len >> 8);
    info[n++] = (uint8_t)out_len;
    info[n++] = (uint8_t)(6 + label_len);
    memcpy(info + n, "tls13 ", 6);
    n += 6;
    memcpy(info + n, label, label_len);
    n += label_len;
    info[n++] = 0; /* empty context */
    info[n++] = 1; /* T(1) */
    uint8_t block[EVP_MAX_MD_SIZE];
    size_t block_len = 0;
    if (!EVP_Q_mac(NULL, "HMAC", NULL, t->digest, NULL, secret, t->hash_len, info, n, block,
                   sizeof block, &block_len) ||
        block_len < out_len) {
        OPENSSL_cleanse(block, sizeof block);
        return -1;
    }
    memcpy(out, block, out_len);
    OPENSSL_cleanse(block, sizeof block);
    return 0;
}

/* Keys `d` from its secret: a new key and IV, the sequence back to 0. */
static int install(pgw_tls13 *t, direction *d, int encrypt) {
    uint8_t key[32];
    int rc = -1;
    if (expand_label(t, d->secret, "key", key, t->key_len) == 0 &&
        expand_label(t, d->secret, "iv", d->iv, IV_LEN) == 0 &&
        EVP_CipherInit_ex(d->ctx, t->cipher, NULL, key, NULL, encrypt) == 1)
        rc = 0;
    OPENSSL_cleanse(key, sizeof key);
    d->seq = 0;
    return rc;
}

/* application_traffic_secret_N+1 (RFC 8446 §7.2), then its keys. */
static int next_generation(pgw_tls13 *t, direction *d, int encrypt) {
    uint8_t next[MAX_SECRET];
    if (expand_label(t, d->secret, "traffic upd", next, t->hash_len) < 0)
        return -1;
    memcpy(d->secret, next, t->hash_len);
    OPENSSL_cleanse(next, sizeof next);
    return install(t, d, encrypt);
}

pgw_tls13 *pgw_tls13_new(unsigned long cipher_id, const uint8_t *read_secret,
                         const uint8_t *write_secret, size_t secret_len) {
    const EVP_CIPHER *cipher;
    const char *digest;
    size_t hash_len, key_len;
    switch (cipher_id) {
    case TLS1_3_CK_AES_128_GCM_SHA256:
        cipher = EVP_aes_128_gcm(), digest = "SHA256", hash_len = 32, key_len = 16;
        break;
    case TLS1_3_CK_AES_256_GCM_SHA384:
        cipher = EVP_aes_256_gcm(), digest = "SHA384", hash_len = 48, key_len = 32;
        break;
    case TLS1_3_CK_CHACHA20_POLY1305_SHA256:
        cipher = EVP_chacha20_poly1305(), digest = "SHA256", hash_len = 32, key_len = 32;
        break;
    default:
        return NULL;
    }
    if (secret_len != hash_len || !cipher)
        return NULL;
    pgw_tls13 *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    t->cipher = cipher;
    t->digest = digest;
    t->hash_len = (uint8_t)hash_len;
    t->key_len = (uint8_t)key_len;
    memcpy(t->rd.secret, read_secret, hash_len);
    memcpy(t->wr.secret, write_secret, hash_len);
    t->rd.ctx = EVP_CIPHER_CTX_new();
    t->wr.ctx = EVP_CIPHER_CTX_new();
    if (!t->rd.ctx || !t->wr.ctx || install(t, &t->rd, 0) < 0 || install(t, &t->wr, 1) < 0) {
        pgw_tls13_free(t);
        ERR_clear_error();
        return NULL;
    }
    return t;
}

void pgw_tls13_free(pgw_tls13 *t) {
    if (!t)
        return;
    EVP_CIPHER_CTX_free(t->rd.ctx);
    EVP_CIPHER_CTX_free(t->wr.ctx);
    OPENSSL_cleanse(t, sizeof *t);
    free(t);
}

pgw_tls13 *pgw_tls13_take(SSL *ssl, pgw_tls_choice *choice) {
    pgw_tls_secrets *s = choice->secrets;
    const SSL_CIPHER *cipher = SSL_get_current_cipher(ssl);
    /* With read-ahead off during the handshake OpenSSL read exactly the
     * client's Finished; a byte past it would be lost here, so check. */
    if (!s || (s->have & 3) != 3 || !cipher || SSL_version(ssl) != TLS1_3_VERSION ||
        SSL_has_pending(ssl))
        return NULL;
    return pgw_tls13_new(SSL_CIPHER_get_id(cipher), s->client, s->server, s->len);
}

/* ---- opening ---- */

static int fail(pgw_tls13 *t, uint8_t alert, const char *why) {
    t->alert = alert;
    t->error = why;
    return PGW_TLS13_FAILED;
}

static void nonce(const direction *d, uint8_t out[IV_LEN]) {
    memcpy(out, d->iv, IV_LEN);
    for (int i = 0; i < 8; i++)
        out[IV_LEN - 1 - i] ^= (uint8_t)(d->seq >> (8 * i));
}

/* Decrypts `body` (len bytes: ciphertext then tag) in place under `header`. */
static int decrypt(pgw_tls13 *t, const uint8_t header[PGW_TLS13_HEADER], uint8_t *body,
                   size_t len) {
    uint8_t iv[IV_LEN];
    int n = 0;
    nonce(&t->rd, iv);
    EVP_CIPHER_CTX *ctx = t->rd.ctx;
    int ok = EVP_DecryptInit_ex(ctx, NULL, NULL, NULL, iv) == 1 &&
             EVP_DecryptUpdate(ctx, NULL, &n, header, PGW_TLS13_HEADER) == 1 &&
             EVP_DecryptUpdate(ctx, body, &n, body, (int)(len - TAG_LEN)) == 1 &&
             EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_SET_TAG, TAG_LEN, body + len - TAG_LEN) == 1 &&
             EVP_DecryptFinal_ex(ctx, body + n, &n) == 1;
    ERR_clear_error();
    return ok ? 0 : -1;
}

/* A handshake record's content: only KeyUpdate may come after the handshake. */
static int handshake_bytes(pgw_tls13 *t, const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++) {
        t->hs[t->hs_len++] = p[i];
        if (t->hs_len == 1 && t->hs[0] != HS_KEY_UPDATE)
            return fail(t, AL_UNEXPECTED_MESSAGE, "unexpected handshake message");
        if (t->hs_len == 4 && (t->hs[1] || t->hs[2] || t->hs[3] != 1))
            return fail(t, AL_DECODE_ERROR, "bad key update");
        if (t->hs_len < 5)
            continue;
        /* A key change ends its record (RFC 8446 §5.1). */
        if (i + 1 != n)
            return fail(t, AL_UNEXPECTED_MESSAGE, "data after a key update in its record");
        if (t->hs[4] > 1)
            return fail(t, AL_ILLEGAL_PARAMETER, "bad key update request");
        t->hs_len = 0;
        if (t->hs[4])
            t->update_owed = 1;
        if (next_generation(t, &t->rd, 0) < 0) {
            ERR_clear_error();
            return fail(t, AL_INTERNAL_ERROR, "key update failed");
        }
    }
    return PGW_TLS13_OK;
}

int pgw_tls13_open(pgw_tls13 *t, uint8_t *buf, size_t len, size_t *used, size_t *plain) {
    size_t pos = 0, out = 0;
    int rc = PGW_TLS13_OK;
    *used = *plain = 0;
    if (t->error)
        return PGW_TLS13_FAILED;
    if (t->closed)
        return PGW_TLS13_CLOSED;
    while (len - pos >= PGW_TLS13_HEADER) {
        uint8_t header[PGW_TLS13_HEADER];
        memcpy(header, buf + pos, sizeof header);
        size_t body_len = (size_t)header[3] << 8 | header[4];
        /* After the handshake only protected records (outer type 23) may come:
         * a plaintext alert or change_cipher_spec is an unexpected message. */
        if (header[0] != CT_APPLICATION) {
            rc = fail(t, AL_UNEXPECTED_MESSAGE, "unexpected record type");
            break;
        }
        if (PGW_TLS13_HEADER + body_len > PGW_TLS13_MAX_RECORD) {
            rc = fail(t, AL_RECORD_OVERFLOW, "record too long");
            break;
        }
        if (body_len < TAG_LEN) {
            rc = fail(t, AL_BAD_RECORD_MAC, "bad record mac");
            break;
        }
        if (len - pos - PGW_TLS13_HEADER < body_len)
            break; /* the rest comes later */
        /* Opened where its plaintext belongs: right after the last one's (out
         * ≤ pos, so moving the body down overwrites only opened records). */
        uint8_t *body = buf + out;
        memmove(body, buf + pos + PGW_TLS13_HEADER, body_len);
        pos += PGW_TLS13_HEADER + body_len;
        if (decrypt(t, header, body, body_len) < 0) {
            rc = fail(t, AL_BAD_RECORD_MAC, "bad record mac");
            break;
        }
        t->rd.seq++;
        /* TLSInnerPlaintext: content, the real type, zero padding. */
        size_t n = body_len - TAG_LEN;
        while (n && !body[n - 1])
            n--;
        if (!n) {
            rc = fail(t, AL_UNEXPECTED_MESSAGE, "record without a content type");
            break;
        }
        uint8_t type = body[--n];
        if (n > PGW_TLS13_MAX_PLAIN) {
            rc = fail(t, AL_RECORD_OVERFLOW, "record too long");
            break;
        }
        if (t->hs_len && type != CT_HANDSHAKE) {
            rc = fail(t, AL_UNEXPECTED_MESSAGE, "record inside a handshake message");
            break;
        }
        if (type == CT_APPLICATION) {
            out += n; /* zero-length application data is allowed and means nothing */
        } else if (type == CT_ALERT) {
            if (n != 2) {
                rc = fail(t, AL_DECODE_ERROR, "bad alert");
                break;
            }
            if (body[1] == AL_USER_CANCELED)
                continue; /* a close_notify follows */
            if (body[1] == AL_CLOSE_NOTIFY) {
                t->closed = 1;
                rc = PGW_TLS13_CLOSED;
                pos = len; /* nothing after it counts */
                break;
            }
            rc = fail(t, 0, "alert from the client"); /* every other alert is fatal */
            break;
        } else if (type == CT_HANDSHAKE) {
            if (!n) {
                rc = fail(t, AL_UNEXPECTED_MESSAGE, "empty handshake record");
                break;
            }
            if ((rc = handshake_bytes(t, body, n)) != PGW_TLS13_OK)
                break;
        } else {
            rc = fail(t, AL_UNEXPECTED_MESSAGE, "unexpected content type");
            break;
        }
    }
    *used = rc == PGW_TLS13_FAILED ? len : pos;
    *plain = out;
    return rc;
}

/* ---- sealing ---- */

/* One record of `type` holding p[0, n) at out (n + PGW_TLS13_OVERHEAD bytes). */
static int seal_record(pgw_tls13 *t, uint8_t type, const uint8_t *p, size_t n, uint8_t *out) {
    size_t body_len = n + 1 + TAG_LEN;
    out[0] = CT_APPLICATION;
    out[1] = 3;
    out[2] = 3;
    out[3] = (uint8_t)(body_len >> 8);
    out[4] = (uint8_t)body_len;
    uint8_t iv[IV_LEN];
    nonce(&t->wr, iv);
    EVP_CIPHER_CTX *ctx = t->wr.ctx;
    uint8_t *body = out + PGW_TLS13_HEADER;
    int a = 0, b = 0, c = 0, d = 0;
    int ok = EVP_EncryptInit_ex(ctx, NULL, NULL, NULL, iv) == 1 &&
             EVP_EncryptUpdate(ctx, NULL, &a, out, PGW_TLS13_HEADER) == 1 &&
             (n == 0 || EVP_EncryptUpdate(ctx, body, &b, p, (int)n) == 1) &&
             EVP_EncryptUpdate(ctx, body + b, &c, &type, 1) == 1 &&
             EVP_EncryptFinal_ex(ctx, body + b + c, &d) == 1 &&
             (size_t)(b + c + d) == n + 1 &&
             EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_AEAD_GET_TAG, TAG_LEN, body + n + 1) == 1;
    ERR_clear_error();
    if (!ok) {
        t->error = "encryption failed";
        return -1;
    }
    t->wr.seq++;
    return 0;
}

int pgw_tls13_update_owed(const pgw_tls13 *t) { return t->update_owed; }

/* Our KeyUpdate (update_not_requested), then the new write key. */
static int send_update(pgw_tls13 *t, uint8_t *out) {
    static const uint8_t key_update[] = {HS_KEY_UPDATE, 0, 0, 1, 0};
    if (seal_record(t, CT_HANDSHAKE, key_update, sizeof key_update, out) < 0)
        return -1;
    t->update_owed = 0;
    if (next_generation(t, &t->wr, 1) < 0) {
        ERR_clear_error();
        t->error = "key update failed";
        return -1;
    }
    return 0;
}

size_t pgw_tls13_seal(pgw_tls13 *t, const uint8_t *p, size_t n, uint8_t *out, size_t cap,
                      size_t *outlen) {
    size_t done = 0, len = 0;
    *outlen = 0;
    if (t->error)
        return 0;
    for (;;) {
        if (t->update_owed || t->wr.seq >= KEY_RECORDS) {
            if (cap - len < 5 + PGW_TLS13_OVERHEAD)
                break;
            if (send_update(t, out + len) < 0)
                return *outlen = 0;
            len += 5 + PGW_TLS13_OVERHEAD;
        }
        if (done == n || cap - len <= PGW_TLS13_OVERHEAD)
            break;
        size_t chunk = n - done;
        if (chunk > PGW_TLS13_MAX_PLAIN)
            chunk = PGW_TLS13_MAX_PLAIN;
        if (chunk > cap - len - PGW_TLS13_OVERHEAD)
            chunk = cap - len - PGW_TLS13_OVERHEAD;
        if (seal_record(t, CT_APPLICATION, p + done, chunk, out + len) < 0)
            return *outlen = 0;
        len += chunk + PGW_TLS13_OVERHEAD;
        done += chunk;
    }
    *outlen = len;
    return done;
}

size_t pgw_tls13_alert(pgw_tls13 *t, uint8_t description, uint8_t *out, size_t cap) {
    uint8_t alert[2] = {description == AL_CLOSE_NOTIFY ? 1 : 2, description};
    if (cap < sizeof alert + PGW_TLS13_OVERHEAD || seal_record(t, CT_ALERT, alert, 2, out) < 0)
        return 0;
    return sizeof alert + PGW_TLS13_OVERHEAD;
}

uint8_t pgw_tls13_alert_owed(const pgw_tls13 *t) { return t->alert; }

const char *pgw_tls13_error(const pgw_tls13 *t) { return t->error ? t->error : "closed"; }
