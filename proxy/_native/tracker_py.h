/* The trackers' Python types (tracker_py.c); module.c calls this at init. */
#ifndef PGW_TRACKER_PY_H
#define PGW_TRACKER_PY_H

#include <Python.h>

/* Adds FrontendTracker and BackendTracker to `module`. 0, or -1 with an exception set. */
int pgw_tracker_add_types(PyObject *module);

#endif
