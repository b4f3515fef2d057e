/* proxy._dataplane.FrontendTracker / BackendTracker: the C trackers (tracker.c)
 * under the Python trackers' API (proxy/pgwire/tracker.py), so that
 * tests/native/test_tracker.py can feed both the same chunks and compare every
 * attribute. The engine uses tracker.c directly; these types are for tests and
 * for checking a build.
 *
 * feed() raises proxy.pgwire.errors.ProtocolViolation with the Python tracker's
 * message on an invalid length (ValueError if that module cannot be imported at
 * init; the module exports the class as ProtocolViolation);
 * afterwards the tracker is broken and ignores input, as the Python one is.
 * Attributes are read-only here (the Python classes' are plain slots). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "tracker.h"
#include "tracker_py.h"

typedef struct {
    PyObject_HEAD
    pgw_frontend t;
} FrontendObject;

typedef struct {
    PyObject_HEAD
    pgw_backend t;
} BackendObject;

/* The Python tracker's error: "invalid message length {length} for message
 * type {bytes([type_])!r} from the {direction}", as the module's
 * ProtocolViolation (proxy.pgwire.errors', put there at init; ValueError when
 * that could not be imported). Looked up on the type's module, not imported
 * per error: an error costs no trip through the import system. */
static void raise_invalid(PyObject *self, const pgw_framer *f, const char *direction)
{
    PyObject *type_bytes = PyBytes_FromStringAndSize((const char *)f->head, 1);
    if (!type_bytes)
        return;
    PyObject *message = PyUnicode_FromFormat("invalid message length %u for message type %R from the %s",
                                             (unsigned)f->head[1], type_bytes, direction);
    Py_DECREF(type_bytes);
    if (!message)
        return;
    PyObject *module = PyType_GetModule(Py_TYPE(self)); /* borrowed */
    PyObject *exc_type = module ? PyObject_GetAttrString(module, "ProtocolViolation") : NULL;
    if (!exc_type) {
        PyErr_Clear();
        exc_type = Py_NewRef(PyExc_ValueError);
    }
    PyObject *exc = PyObject_CallOneArg(exc_type, message);
    Py_DECREF(message);
    if (exc) {
        PyErr_SetObject(exc_type, exc);
        Py_DECREF(exc);
    }
    Py_DECREF(exc_type);
}

static PyObject *at_boundary_of(const pgw_framer *f)
{
    return PyBool_FromLong(pgw_at_boundary(f));
}

/* ---- FrontendTracker ---- */

static PyObject *frontend_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, ":FrontendTracker", kwlist))
        return NULL;
    FrontendObject *self = (FrontendObject *)type->tp_alloc(type, 0);
    if (self)
        pgw_frontend_init(&self->t);
    return (PyObject *)self;
}

static PyObject *frontend_feed(FrontendObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int rc = pgw_frontend_feed(&self->t, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    if (rc < 0) {
        raise_invalid((PyObject *)self, &self->t.f, "client");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *frontend_get_at_boundary(FrontendObject *self, void *closure)
{
    (void)closure;
    return at_boundary_of(&self->t.f);
}

static PyObject *frontend_get_direction(FrontendObject *self, void *closure)
{
    (void)self;
    (void)closure;
    return PyUnicode_FromString("client");
}

static PyMethodDef frontend_methods[] = {
    {"feed", (PyCFunction)frontend_feed, METH_O,
     "Account for one chunk. Raises ProtocolViolation on an invalid length; after that "
     "the tracker is broken and ignores further input."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef frontend_members[] = {
    {"requests", T_ULONGLONG, offsetof(FrontendObject, t.requests), READONLY,
     "messages that each earn one ReadyForQuery (Query, Sync, FunctionCall)"},
    {"unsynced", T_BOOL, offsetof(FrontendObject, t.unsynced), READONLY,
     "Parse/Bind/Execute/Describe/Close/Flush sent since the last Sync"},
    {"terminated", T_BOOL, offsetof(FrontendObject, t.terminated), READONLY,
     "the client sent Terminate"},
    {"broken", T_BOOL, offsetof(FrontendObject, t.f.broken), READONLY,
     "an invalid length was seen: input is ignored from then on"},
    {"last_type", T_UBYTE, offsetof(FrontendObject, t.f.last_type), READONLY,
     "the type of the last message whose header was read (0 before any)"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef frontend_getset[] = {
    {"at_boundary", (getter)frontend_get_at_boundary, NULL,
     "True between two messages (nothing of a message is pending)", NULL},
    {"direction", (getter)frontend_get_direction, NULL, "'client'", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot frontend_slots[] = {
    {Py_tp_doc, "The client -> compute direction (C twin of proxy.pgwire.tracker.FrontendTracker)."},
    {Py_tp_new, frontend_new},
    {Py_tp_methods, frontend_methods},
    {Py_tp_members, frontend_members},
    {Py_tp_getset, frontend_getset},
    {0, NULL},
};

static PyType_Spec frontend_spec = {
    .name = "proxy._dataplane.FrontendTracker",
    .basicsize = sizeof(FrontendObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = frontend_slots,
};

/* ---- BackendTracker ---- */

static PyObject *backend_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, ":BackendTracker", kwlist))
        return NULL;
    BackendObject *self = (BackendObject *)type->tp_alloc(type, 0);
    if (self)
        pgw_backend_init(&self->t);
    return (PyObject *)self;
}

static PyObject *backend_feed(BackendObject *self, PyObject *arg)
{
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int rc = pgw_backend_feed(&self->t, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    if (rc < 0) {
        raise_invalid((PyObject *)self, &self->t.f, "compute");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *backend_get_status(BackendObject *self, void *closure)
{
    (void)closure;
    return PyBytes_FromStringAndSize((const char *)&self->t.status, 1);
}

static PyObject *backend_get_at_boundary(BackendObject *self, void *closure)
{
    (void)closure;
    return at_boundary_of(&self->t.f);
}

static PyObject *backend_get_idle(BackendObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(pgw_backend_idle(&self->t));
}

static PyObject *backend_get_direction(BackendObject *self, void *closure)
{
    (void)self;
    (void)closure;
    return PyUnicode_FromString("compute");
}

static PyMethodDef backend_methods[] = {
    {"feed", (PyCFunction)backend_feed, METH_O,
     "Account for one chunk. Raises ProtocolViolation on an invalid length; after that "
     "the tracker is broken and ignores further input."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef backend_members[] = {
    {"ready_count", T_ULONGLONG, offsetof(BackendObject, t.ready_count), READONLY,
     "ReadyForQuery messages seen"},
    {"copying", T_BOOL, offsetof(BackendObject, t.copying), READONLY,
     "between a Copy*Response and the next ReadyForQuery"},
    {"fatal", T_BOOL, offsetof(BackendObject, t.fatal), READONLY,
     "the compute sent a FATAL/PANIC ErrorResponse"},
    {"broken", T_BOOL, offsetof(BackendObject, t.f.broken), READONLY,
     "an invalid length was seen: input is ignored from then on"},
    {"last_type", T_UBYTE, offsetof(BackendObject, t.f.last_type), READONLY,
     "the type of the last message whose header was read ('Z' before any)"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef backend_getset[] = {
    {"status", (getter)backend_get_status, NULL,
     "the last ReadyForQuery's transaction status (b'I' before any)", NULL},
    {"at_boundary", (getter)backend_get_at_boundary, NULL,
     "True between two messages (nothing of a message is pending)", NULL},
    {"idle", (getter)backend_get_idle, NULL,
     "at a boundary right after ReadyForQuery 'I': no transaction is open", NULL},
    {"direction", (getter)backend_get_direction, NULL, "'compute'", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot backend_slots[] = {
    {Py_tp_doc, "The compute -> client direction (C twin of proxy.pgwire.tracker.BackendTracker)."},
    {Py_tp_new, backend_new},
    {Py_tp_methods, backend_methods},
    {Py_tp_members, backend_members},
    {Py_tp_getset, backend_getset},
    {0, NULL},
};

static PyType_Spec backend_spec = {
    .name = "proxy._dataplane.BackendTracker",
    .basicsize = sizeof(BackendObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = backend_slots,
};

static int add_type(PyObject *module, PyType_Spec *spec)
{
    PyObject *type = PyType_FromModuleAndSpec(module, spec, NULL);
    if (!type)
        return -1;
    int rc = PyModule_AddType(module, (PyTypeObject *)type);
    Py_DECREF(type);
    return rc;
}

/* proxy.pgwire.errors.ProtocolViolation, the error feed() raises, as the
 * module's attribute; ValueError stands in where proxy is not importable
 * (then the attribute is absent). */
static int add_protocol_violation(PyObject *module)
{
    PyObject *errors = PyImport_ImportModule("proxy.pgwire.errors");
    if (!errors) {
        PyErr_Clear();
        return 0;
    }
    PyObject *exc_type = PyObject_GetAttrString(errors, "ProtocolViolation");
    Py_DECREF(errors);
    if (!exc_type) {
        PyErr_Clear();
        return 0;
    }
    int rc = PyModule_AddObjectRef(module, "ProtocolViolation", exc_type);
    Py_DECREF(exc_type);
    return rc;
}

int pgw_tracker_add_types(PyObject *module)
{
    if (add_protocol_violation(module) < 0 || add_type(module, &frontend_spec) < 0 ||
        add_type(module, &backend_spec) < 0)
        return -1;
    return 0;
}
