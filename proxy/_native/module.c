/* proxy._dataplane: the native data plane's Python face (the Engine type and
 * its constants; the trackers' types come from tracker_py.c). Every call into
 * the engine runs without the GIL: it may wait for a connection's mutex, held
 * by a worker for the time of one chunk. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

#include "engine.h"
#include "tls_native.h"
#include "tracker_py.h"

typedef struct {
    PyObject_HEAD
    pgw_engine *engine;
} EngineObject;

static PyObject *raise_code(int rc) {
    switch (rc) {
    case PGW_ENOCONN:
        PyErr_SetString(PyExc_ValueError, "unknown or closed connection");
        break;
    case PGW_EMODE:
        PyErr_SetString(PyExc_RuntimeError, "the connection is not in a mode for this call");
        break;
    case PGW_ENOMEM:
        PyErr_NoMemory();
        break;
    case PGW_ESHUTDOWN:
        PyErr_SetString(PyExc_RuntimeError, "the engine is shut down");
        break;
    case PGW_ENOTLS:
        PyErr_SetString(PyExc_RuntimeError, "set_certificates() before a TLS accept()");
        break;
    case PGW_EFULL:
        PyErr_SetString(PyExc_BufferError, "the client's queue is full");
        break;
    default:
        PyErr_SetFromErrno(PyExc_OSError);
        break;
    }
    return NULL;
}

static pgw_engine *engine_of(EngineObject *self) {
    if (!self->engine)
        PyErr_SetString(PyExc_RuntimeError, "the engine is not initialised");
    return self->engine;
}

static int Engine_init(EngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"threads", NULL};
    int threads;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "i", kwlist, &threads))
        return -1;
    if (self->engine) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is already initialised");
        return -1;
    }
    char err[160];
    pgw_engine *e;
    Py_BEGIN_ALLOW_THREADS
    e = pgw_engine_new(threads, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (!e) {
        PyErr_SetString(threads < 1 || threads > 256 ? PyExc_ValueError : PyExc_OSError, err);
        return -1;
    }
    self->engine = e;
    return 0;
}

static void Engine_dealloc(EngineObject *self) {
    if (self->engine) {
        pgw_engine *e = self->engine;
        self->engine = NULL;
        Py_BEGIN_ALLOW_THREADS
        pgw_engine_shutdown(e);
        pgw_engine_free(e);
        Py_END_ALLOW_THREADS
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Engine_fileno(EngineObject *self, PyObject *Py_UNUSED(ignored)) {
    pgw_engine *e = engine_of(self);
    return e ? PyLong_FromLong(pgw_engine_fileno(e)) : NULL;
}

static PyObject *event_payload(pgw_event *ev) {
    switch (ev->kind) {
    case PGW_EV_READY: {
        PyObject *name = ev->server_name
                             ? PyUnicode_DecodeASCII(ev->server_name, (Py_ssize_t)strlen(ev->server_name), "strict")
                             : Py_NewRef(Py_None);
        if (!name)
            return NULL;
        PyObject *alpn = ev->alpn ? PyUnicode_FromString(ev->alpn) : Py_NewRef(Py_None);
        if (!alpn) {
            Py_DECREF(name);
            return NULL;
        }
        PyObject *records = ev->records ? PyUnicode_FromString(ev->records) : Py_NewRef(Py_None);
        if (!records) {
            Py_DECREF(name);
            Py_DECREF(alpn);
            return NULL;
        }
        return Py_BuildValue("(NiNN)", name, ev->cert_index, alpn, records);
    }
    case PGW_EV_YIELDED:
        return Py_BuildValue("(iy#s)", ev->fd, ev->data ? (const char *)ev->data : "",
                             (Py_ssize_t)ev->len, ev->reason);
    case PGW_EV_CLOSED:
    case PGW_EV_COMPUTE_CLOSED:
    case PGW_EV_CLIENT_CLOSED:
        return PyUnicode_FromString(ev->reason);
    default:
        return Py_NewRef(Py_None);
    }
}

static PyObject *Engine_events(EngineObject *self, PyObject *Py_UNUSED(ignored)) {
    pgw_engine *e = engine_of(self);
    if (!e)
        return NULL;
    pgw_event *ev;
    Py_BEGIN_ALLOW_THREADS
    ev = pgw_engine_events(e);
    Py_END_ALLOW_THREADS
    PyObject *list = PyList_New(0);
    while (ev) {
        pgw_event *next = ev->next;
        PyObject *item = NULL;
        if (list) {
            PyObject *payload = event_payload(ev);
            if (payload)
                item = Py_BuildValue("(KiN)", (unsigned long long)ev->conn_id, ev->kind, payload);
            if (item) {
                ev->fd = -1; /* a yielded compute fd is Python's now */
                if (PyList_Append(list, item) < 0)
                    Py_CLEAR(list);
                Py_DECREF(item);
            } else {
                Py_CLEAR(list);
            }
        }
        if (!list && ev->fd >= 0 && ev->kind == PGW_EV_YIELDED)
            close(ev->fd); /* undeliverable: not leaked */
        pgw_event_free(ev);
        ev = next;
    }
    return list;
}

/* Fills names[] from a dict of str -> int; the strings stay owned by the dict. */
static int names_from_dict(PyObject *dict, pgw_tls_name **out, size_t *n) {
    if (!PyDict_Check(dict)) {
        PyErr_SetString(PyExc_TypeError, "exact and wildcard must be dicts of str to int");
        return -1;
    }
    Py_ssize_t size = PyDict_Size(dict), pos = 0, i = 0;
    *out = PyMem_Calloc(size ? (size_t)size : 1, sizeof **out);
    if (!*out) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *key, *value;
    while (PyDict_Next(dict, &pos, &key, &value)) {
        const char *name = PyUnicode_Check(key) ? PyUnicode_AsUTF8(key) : NULL;
        if (!name) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "certificate names must be str");
            return -1;
        }
        long index = PyLong_AsLong(value);
        if (index == -1 && PyErr_Occurred())
            return -1;
        if (index < 0 || index > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "certificate index out of range");
            return -1;
        }
        (*out)[i].name = name;
        (*out)[i].index = (int)index;
        i++;
    }
    *n = (size_t)i;
    return 0;
}

static PyObject *Engine_set_certificates(EngineObject *self, PyObject *args) {
    pgw_engine *e = engine_of(self);
    PyObject *certs, *exact, *wildcard;
    if (!e || !PyArg_ParseTuple(args, "OOO:set_certificates", &certs, &exact, &wildcard))
        return NULL;
    PyObject *seq = PySequence_Fast(certs, "certs must be a list of (cert_file, key_file)");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    const char **cert_files = PyMem_Calloc(n ? (size_t)n : 1, sizeof *cert_files);
    const char **key_files = PyMem_Calloc(n ? (size_t)n : 1, sizeof *key_files);
    pgw_tls_name *ex = NULL, *wild = NULL;
    size_t n_ex = 0, n_wild = 0;
    PyObject *result = NULL;
    PyObject *paths = PyList_New(0); /* keeps the encoded paths alive */
    if (!cert_files || !key_files || !paths) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *cert, *key;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "O&O&", PyUnicode_FSConverter,
                              &cert, PyUnicode_FSConverter, &key))
            goto done;
        int failed = PyList_Append(paths, cert) < 0 || PyList_Append(paths, key) < 0;
        cert_files[i] = PyBytes_AS_STRING(cert);
        key_files[i] = PyBytes_AS_STRING(key);
        Py_DECREF(cert);
        Py_DECREF(key);
        if (failed)
            goto done;
    }
    if (names_from_dict(exact, &ex, &n_ex) < 0 || names_from_dict(wildcard, &wild, &n_wild) < 0)
        goto done;
    char err[256];
    pgw_tls_table *table;
    Py_BEGIN_ALLOW_THREADS
    table = pgw_tls_table_new(cert_files, key_files, (size_t)n, ex, n_ex, wild, n_wild, err,
                              sizeof err);
    Py_END_ALLOW_THREADS
    if (!table) {
        PyErr_SetString(PyExc_ValueError, err);
        goto done;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pgw_engine_set_tls(e, table);
    Py_END_ALLOW_THREADS
    result = rc ? raise_code(rc) : Py_NewRef(Py_None);
done:
    PyMem_Free(cert_files);
    PyMem_Free(key_files);
    PyMem_Free(ex);
    PyMem_Free(wild);
    Py_XDECREF(paths);
    Py_DECREF(seq);
    return result;
}

static PyObject *Engine_accept(EngineObject *self, PyObject *args) {
    pgw_engine *e = engine_of(self);
    int fd, tls;
    if (!e || !PyArg_ParseTuple(args, "ip:accept", &fd, &tls))
        return NULL;
    if (fd < 0) {
        PyErr_SetString(PyExc_ValueError, "invalid file descriptor");
        return NULL;
    }
    uint64_t id = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pgw_engine_accept(e, fd, tls, &id);
    Py_END_ALLOW_THREADS
    return rc ? raise_code(rc) : PyLong_FromUnsignedLongLong(id);
}

static int parse_id(PyObject *obj, uint64_t *id) {
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError) ||
            PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "unknown or closed connection");
        }
        return -1;
    }
    *id = v;
    return 0;
}

static PyObject *Engine_read(EngineObject *self, PyObject *arg) {
    pgw_engine *e = engine_of(self);
    uint64_t id;
    if (!e || parse_id(arg, &id) < 0)
        return NULL;
    uint8_t *data;
    size_t len;
    int eof, rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pgw_engine_read(e, id, &data, &len, &eof);
    Py_END_ALLOW_THREADS
    if (rc)
        return raise_code(rc);
    if (eof)
        Py_RETURN_NONE;
    PyObject *out = PyBytes_FromStringAndSize((const char *)data, (Py_ssize_t)len);
    free(data);
    return out;
}

static PyObject *Engine_write(EngineObject *self, PyObject *args) {
    pgw_engine *e = engine_of(self);
    PyObject *idobj;
    Py_buffer buf;
    uint64_t id;
    if (!e || !PyArg_ParseTuple(args, "Oy*:write", &idobj, &buf))
        return NULL;
    if (parse_id(idobj, &id) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    size_t queued = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pgw_engine_write(e, id, buf.buf, (size_t)buf.len, &queued);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    return rc ? raise_code(rc) : PyLong_FromSize_t(queued);
}

static PyObject *Engine_pause(EngineObject *self, PyObject *args) {
    pgw_engine *e = engine_of(self);
    PyObject *idobj;
    int paused;
    uint64_t id;
    if (!e || !PyArg_ParseTuple(args, "Op:pause", &idobj, &paused) || parse_id(idobj, &id) < 0)
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pgw_engine_pause(e, id, paused);
    Py_END_ALLOW_THREADS
    return rc ? raise_code(rc) : Py_NewRef(Py_None);
}

static PyObject *Engine_splice(EngineObject *self, PyObject *args) {
    pgw_engine *e = engine_of(self);
    PyObject *idobj;
    int fd, flags, status;
    Py_buffer buf;
    uint64_t id;
    if (!e || !PyArg_ParseTuple(args, "Oiy*ii:splice", &idobj, &fd, &buf, &flags, &status))
        return NULL;
    int rc = PGW_OK;
    if (parse_id(idobj, &id) < 0) {
        PyBuffer_Release(&buf);
        return NULL;
    }
    if (fd < 0 || (status != 'I' && status != 'T' && status != 'E') ||
        (flags & ~(PGW_MAY_PARK | PGW_REWORD))) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "invalid compute_fd, flags or status");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = pgw_engine_splice(e, id, fd, buf.buf, (size_t)buf.len, flags, status);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    return rc ? raise_code(rc) : Py_NewRef(Py_None);
}

static PyObject *Engine_request_yield(EngineObject *self, PyObject *args) {
    pgw_engine *e = engine_of(self);
    PyObject *idobj;
    int when;
    uint64_t id;
    if (!e || !PyArg_ParseTuple(args, "Oi:request_yield", &idobj, &when) ||
        parse_id(idobj, &id) < 0)
        return NULL;
    if (when != PGW_YIELD_IDLE && when != PGW_YIELD_BOUNDARY && when != PGW_YIELD_NOW) {
        PyErr_SetString(PyExc_ValueError, "when must be YIELD_IDLE, YIELD_BOUNDARY or YIELD_NOW");
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pgw_engine_request_yield(e, id, when);
    Py_END_ALLOW_THREADS
    return rc ? raise_code(rc) : Py_NewRef(Py_None);
}

static PyObject *Engine_state(EngineObject *self, PyObject *arg) {
    pgw_engine *e = engine_of(self);
    uint64_t id;
    if (!e || parse_id(arg, &id) < 0)
        return NULL;
    pgw_state s;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pgw_engine_state(e, id, &s);
    Py_END_ALLOW_THREADS
    if (rc)
        return raise_code(rc);
    return Py_BuildValue("(iiKKNNNNNNNNidKKKIy#)", s.mode, s.status,
                         (unsigned long long)s.ready_count, (unsigned long long)s.requests,
                         PyBool_FromLong(s.unsynced), PyBool_FromLong(s.copying),
                         PyBool_FromLong(s.fatal), PyBool_FromLong(s.front_broken),
                         PyBool_FromLong(s.back_broken), PyBool_FromLong(s.terminated),
                         PyBool_FromLong(s.front_at_boundary), PyBool_FromLong(s.back_at_boundary),
                         s.back_last_type, s.last_client_activity,
                         (unsigned long long)s.bytes_from_client,
                         (unsigned long long)s.bytes_from_compute,
                         (unsigned long long)s.client_queued, (unsigned int)s.front_skip,
                         (const char *)s.front_head, (Py_ssize_t)s.front_head_len);
}

static PyObject *Engine_close(EngineObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"conn_id", "abort", NULL};
    pgw_engine *e = engine_of(self);
    PyObject *idobj;
    int abort = 0;
    uint64_t id;
    if (!e || !PyArg_ParseTupleAndKeywords(args, kwds, "O|p:close", kwlist, &idobj, &abort) ||
        parse_id(idobj, &id) < 0)
        return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = pgw_engine_close(e, id, abort);
    Py_END_ALLOW_THREADS
    return rc ? raise_code(rc) : Py_NewRef(Py_None);
}

static PyObject *Engine_shutdown(EngineObject *self, PyObject *Py_UNUSED(ignored)) {
    pgw_engine *e = engine_of(self);
    if (!e)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pgw_engine_shutdown(e);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef Engine_methods[] = {
    {"fileno", (PyCFunction)Engine_fileno, METH_NOARGS, "The eventfd readable when events wait."},
    {"events", (PyCFunction)Engine_events, METH_NOARGS,
     "Drain the events: a list of (conn_id, kind, payload)."},
    {"set_certificates", (PyCFunction)Engine_set_certificates, METH_VARARGS,
     "set_certificates(certs, exact, wildcard): the certificates for new handshakes."},
    {"accept", (PyCFunction)Engine_accept, METH_VARARGS,
     "accept(fd, tls) -> conn_id: take a connected non-blocking client socket."},
    {"read", (PyCFunction)Engine_read, METH_O,
     "read(conn_id) -> bytes | None: the client's bytes buffered (None at the end)."},
    {"write", (PyCFunction)Engine_write, METH_VARARGS,
     "write(conn_id, data) -> int: queue bytes for the client; bytes still queued."},
    {"pause", (PyCFunction)Engine_pause, METH_VARARGS, "pause(conn_id, paused)"},
    {"splice", (PyCFunction)Engine_splice, METH_VARARGS,
     "splice(conn_id, compute_fd, to_client, flags, status): move bytes natively."},
    {"request_yield", (PyCFunction)Engine_request_yield, METH_VARARGS,
     "request_yield(conn_id, when): give the compute back to Python."},
    {"state", (PyCFunction)Engine_state, METH_O, "state(conn_id) -> tuple: a snapshot."},
    {"close", (PyCFunction)(void (*)(void))Engine_close, METH_VARARGS | METH_KEYWORDS,
     "close(conn_id, abort=False)"},
    {"shutdown", (PyCFunction)Engine_shutdown, METH_NOARGS,
     "Stop the threads and close every connection (idempotent)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "proxy._dataplane.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The native data plane: worker threads that own client sockets (and their "
              "TLS) and splice them to computes.",
    .tp_methods = Engine_methods,
    .tp_init = (initproc)Engine_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "proxy._dataplane",
    .m_doc = "pgwake's native data plane (issue 12): proxy/_native/.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__dataplane(void) {
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module_def);
    if (!m)
        return NULL;
    struct {
        const char *name;
        long value;
    } constants[] = {
        {"READY", PGW_EV_READY},
        {"CLOSED", PGW_EV_CLOSED},
        {"READABLE", PGW_EV_READABLE},
        {"DRAINED", PGW_EV_DRAINED},
        {"YIELDED", PGW_EV_YIELDED},
        {"COMPUTE_CLOSED", PGW_EV_COMPUTE_CLOSED},
        {"CLIENT_CLOSED", PGW_EV_CLIENT_CLOSED},
        {"YIELD_IDLE", PGW_YIELD_IDLE},
        {"YIELD_BOUNDARY", PGW_YIELD_BOUNDARY},
        {"YIELD_NOW", PGW_YIELD_NOW},
        {"MAY_PARK", PGW_MAY_PARK},
        {"REWORD", PGW_REWORD},
        {"MODE_HANDSHAKE", PGW_MODE_HANDSHAKE},
        {"MODE_PYTHON", PGW_MODE_PYTHON},
        {"MODE_SPLICE", PGW_MODE_SPLICE},
        {"MODE_CLOSING", PGW_MODE_CLOSING},
        {"HIGH_WATER", PGW_HIGH_WATER},
        {"LOW_WATER", PGW_LOW_WATER},
    };
    for (size_t i = 0; i < sizeof constants / sizeof constants[0]; i++) {
        if (PyModule_AddIntConstant(m, constants[i].name, constants[i].value) < 0)
            goto fail;
    }
    if (PyModule_AddObjectRef(m, "Engine", (PyObject *)&EngineType) < 0)
        goto fail;
    if (pgw_tracker_add_types(m) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
