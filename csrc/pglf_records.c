/*
 * pglf_records.c - the consumer side of a subscription, in C: the
 * Notification type and a batch drain that turns ring records into
 * Notification objects without running Python code per item.
 *
 * Built as the CPython extension `pglisten_fast._records` next to the cffi
 * module `pglisten_fast._pglf`.  Both compile pglf_ring.c; a ring created
 * by one is read by the other through its address, which is sound only if
 * the two copies agree on the ring's layout: the module constant RING_ABI
 * (PGLF_RING_ABI, see pglf_ring.h) is there to be compared at import with
 * the cffi module's pglf_ring_abi().
 *
 * Thread role: drain() and take() are the ring's consumer; the Python
 * caller holds the subscription's consumer lock, so at most one thread runs
 * them per ring.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>

#include "pglf_platform.h"
#include "pglf_ring.h"

typedef struct {
    PyObject_HEAD
    PyObject *channel;   /* str */
    PyObject *payload;   /* str, or bytes for payload_type=bytes */
    PyObject *reason;    /* str or None */
    long long dropped;
    int pid;
    char connection_reset;
} NotificationObject;

static PyTypeObject NotificationType;
static PyObject *str_listen, *str_reconnect, *str_overflow, *str_empty, *bytes_empty;
/* Interned attribute names, for the fast path of notification_getattro. */
static PyObject *name_channel, *name_payload, *name_pid, *name_reset, *name_reason,
    *name_dropped;

/*
 * A free list of Notification objects: a consumer typically drops one batch
 * and drains the next, so recycling the objects skips the allocator for
 * most of them.  Guarded by the GIL (every user holds it).
 */
#define FREELIST_MAX 4096
static NotificationObject *freelist[FREELIST_MAX];
static int freelist_len;

static NotificationObject *notification_alloc(void)
{
    if (freelist_len > 0) {
        NotificationObject *n = freelist[--freelist_len];
        return (NotificationObject *)PyObject_Init((PyObject *)n, &NotificationType);
    }
    return PyObject_New(NotificationObject, &NotificationType);
}

static PyObject *notification_new(PyTypeObject *type, PyObject *args,
                                  PyObject *kwds)
{
    static char *kwlist[] = {"channel", "payload", "pid", "connection_reset",
                             "reason", "dropped", NULL};
    PyObject *channel, *payload = NULL, *reason = Py_None;
    int pid = 0, reset = 0;
    long long dropped = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "U|OipOL:Notification", kwlist,
                                     &channel, &payload, &pid, &reset, &reason,
                                     &dropped))
        return NULL;
    if (payload != NULL && !PyUnicode_Check(payload) && !PyBytes_Check(payload)) {
        PyErr_SetString(PyExc_TypeError, "payload must be a str or bytes");
        return NULL;
    }
    if (reason != Py_None && !PyUnicode_Check(reason)) {
        PyErr_SetString(PyExc_TypeError, "reason must be a str or None");
        return NULL;
    }
    if (dropped < 0) {
        PyErr_SetString(PyExc_ValueError, "dropped must not be negative");
        return NULL;
    }
    if (type != &NotificationType) {
        PyErr_SetString(PyExc_TypeError, "Notification cannot be subclassed");
        return NULL;
    }
    NotificationObject *n = notification_alloc();
    if (n == NULL)
        return NULL;
    n->channel = Py_NewRef(channel);
    n->payload = Py_NewRef(payload ? payload : str_empty);
    n->reason = Py_NewRef(reason);
    n->pid = pid;
    n->connection_reset = (char)(reset != 0);
    n->dropped = dropped;
    return (PyObject *)n;
}

static void notification_dealloc(NotificationObject *n)
{
    Py_DECREF(n->channel);
    Py_DECREF(n->payload);
    Py_DECREF(n->reason);
    if (freelist_len < FREELIST_MAX)
        freelist[freelist_len++] = n;
    else
        PyObject_Free(n);
}

/* Payloads are mostly ASCII: copy them straight into a compact str. */
static PyObject *decode_payload(const char *p, uint32_t len, const char *encoding)
{
    if (encoding == NULL) {
        uint32_t i = 0;
        uint64_t acc = 0;
        for (; i + 8 <= len; i += 8) {
            uint64_t w;
            memcpy(&w, p + i, 8);
            acc |= w;
        }
        for (; i < len; i++)
            acc |= (unsigned char)p[i];
        if (!(acc & 0x8080808080808080ULL)) {
            PyObject *s = PyUnicode_New(len, 127);
            if (s != NULL && len)
                memcpy(PyUnicode_1BYTE_DATA(s), p, len);
            return s;
        }
        return PyUnicode_DecodeUTF8(p, len, "replace");
    }
    return PyUnicode_Decode(p, len, encoding, "replace");
}

/*
 * Attribute reads are the consumer's per-item work: answer the six fields
 * by name identity (attribute names in code are interned) before the
 * generic lookup through the type's descriptors.
 */
static PyObject *notification_getattro(PyObject *self, PyObject *name)
{
    NotificationObject *n = (NotificationObject *)self;
    if (name == name_payload)
        return Py_NewRef(n->payload);
    if (name == name_channel)
        return Py_NewRef(n->channel);
    if (name == name_reset)
        return PyBool_FromLong(n->connection_reset);
    if (name == name_pid)
        return PyLong_FromLong(n->pid);
    if (name == name_reason)
        return Py_NewRef(n->reason);
    if (name == name_dropped)
        return PyLong_FromLongLong(n->dropped);
    return PyObject_GenericGetAttr(self, name);
}

static PyObject *notification_repr(NotificationObject *n)
{
    if (!n->connection_reset)
        return PyUnicode_FromFormat("Notification(channel=%R, payload=%R, pid=%d)",
                                    n->channel, n->payload, n->pid);
    if (n->dropped)
        return PyUnicode_FromFormat(
            "Notification(channel=%R, connection_reset=True, reason=%R, "
            "dropped=%lld)",
            n->channel, n->reason, n->dropped);
    return PyUnicode_FromFormat(
        "Notification(channel=%R, connection_reset=True, reason=%R)", n->channel,
        n->reason);
}

static PyObject *notification_astuple(NotificationObject *n)
{
    return Py_BuildValue("(OOiOOL)", n->channel, n->payload, n->pid,
                         n->connection_reset ? Py_True : Py_False, n->reason,
                         n->dropped);
}

static Py_hash_t notification_hash(NotificationObject *n)
{
    PyObject *t = notification_astuple(n);
    if (t == NULL)
        return -1;
    Py_hash_t h = PyObject_Hash(t);
    Py_DECREF(t);
    return h;
}

static PyObject *notification_richcompare(PyObject *a, PyObject *b, int op)
{
    if (!PyObject_TypeCheck(b, &NotificationType) ||
        (op != Py_EQ && op != Py_NE))
        Py_RETURN_NOTIMPLEMENTED;
    NotificationObject *x = (NotificationObject *)a, *y = (NotificationObject *)b;
    int eq = x->pid == y->pid && x->connection_reset == y->connection_reset &&
             x->dropped == y->dropped;
    if (eq) {
        PyObject *fields[3][2] = {{x->channel, y->channel},
                                  {x->payload, y->payload},
                                  {x->reason, y->reason}};
        for (int i = 0; i < 3 && eq; i++) {
            int rc = PyObject_RichCompareBool(fields[i][0], fields[i][1], Py_EQ);
            if (rc < 0)
                return NULL;
            eq = rc;
        }
    }
    if (op == Py_NE)
        eq = !eq;
    return PyBool_FromLong(eq);
}

static PyObject *notification_reduce(NotificationObject *n,
                                     PyObject *Py_UNUSED(ignored))
{
    PyObject *t = notification_astuple(n);
    if (t == NULL)
        return NULL;
    return Py_BuildValue("(ON)", (PyObject *)&NotificationType, t);
}

static PyObject *notification_get_reset(NotificationObject *n, void *closure)
{
    (void)closure;
    return PyBool_FromLong(n->connection_reset);
}

static PyMemberDef notification_members[] = {
    {"channel", T_OBJECT, offsetof(NotificationObject, channel), READONLY,
     "Channel the notification was sent on (str)."},
    {"payload", T_OBJECT, offsetof(NotificationObject, payload), READONLY,
     "Payload decoded with the connection's client encoding; \"\" on markers."},
    {"pid", T_INT, offsetof(NotificationObject, pid), READONLY,
     "Process id of the sending backend; 0 on markers."},
    {"reason", T_OBJECT, offsetof(NotificationObject, reason), READONLY,
     "\"listen\", \"reconnect\" or \"overflow\" on markers, else None."},
    {"dropped", T_LONGLONG, offsetof(NotificationObject, dropped), READONLY,
     "On overflow markers: notifications lost at this point; else 0."},
    {NULL}};

static PyGetSetDef notification_getset[] = {
    {"connection_reset", (getter)notification_get_reset, NULL,
     "True on markers: state may have been missed; reload it from the source "
     "of truth.",
     NULL},
    {NULL}};

static PyMethodDef notification_methods[] = {
    {"__reduce__", (PyCFunction)notification_reduce, METH_NOARGS, NULL},
    {NULL}};

PyDoc_STRVAR(notification_doc,
             "Notification(channel, payload='', pid=0, connection_reset=False, "
             "reason=None, dropped=0)\n--\n\n"
             "One notification received on a channel, or a marker.\n\n"
             "Immutable.  A marker (connection_reset=True) says that "
             "notifications may have been missed on `channel` before it: "
             "`reason` is \"listen\" (LISTEN just took effect), \"reconnect\" "
             "(the connection was re-established) or \"overflow\" (`dropped` "
             "notifications were lost because the subscription's buffer was "
             "full).");

static PyTypeObject NotificationType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "pglisten_fast.Notification",
    .tp_basicsize = sizeof(NotificationObject),
    .tp_dealloc = (destructor)notification_dealloc,
    .tp_repr = (reprfunc)notification_repr,
    .tp_hash = (hashfunc)notification_hash,
    .tp_richcompare = notification_richcompare,
    .tp_getattro = notification_getattro,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = notification_doc,
    .tp_members = notification_members,
    .tp_getset = notification_getset,
    .tp_methods = notification_methods,
    .tp_new = notification_new,
};

/* ------------------------------------------------------------------ */

static PyObject *make_record(const pglf_rec *h, PyObject *channels,
                             const char *encoding, int raw)
{
    if ((Py_ssize_t)h->chan >= PyTuple_GET_SIZE(channels)) {
        PyErr_SetString(PyExc_RuntimeError, "ring record names an unknown channel");
        return NULL;
    }
    const char *body = (const char *)h + PGLF_REC_HDR;
    PyObject *payload;
    if (h->kind == PGLF_KIND_NOTIFY) {
        payload = raw ? PyBytes_FromStringAndSize(body, (Py_ssize_t)h->len)
                      : decode_payload(body, h->len, encoding);
        if (payload == NULL)
            return NULL;
    } else {
        payload = Py_NewRef(raw ? bytes_empty : str_empty);
    }
    NotificationObject *n = notification_alloc();
    if (n == NULL) {
        Py_DECREF(payload);
        return NULL;
    }
    n->channel = Py_NewRef(PyTuple_GET_ITEM(channels, h->chan));
    n->payload = payload;
    n->dropped = 0;
    if (h->kind == PGLF_KIND_NOTIFY) {
        n->pid = h->pid;
        n->connection_reset = 0;
        n->reason = Py_NewRef(Py_None);
    } else {
        n->pid = 0;
        n->connection_reset = 1;
        switch (h->reason) {
        case PGLF_REASON_LISTEN:
            n->reason = Py_NewRef(str_listen);
            break;
        case PGLF_REASON_RECONNECT:
            n->reason = Py_NewRef(str_reconnect);
            break;
        default: {
            uint64_t d = 0;
            if (h->len >= sizeof(d))
                memcpy(&d, body, sizeof(d));
            n->reason = Py_NewRef(str_overflow);
            n->dropped = (long long)d;
        }
        }
    }
    return (PyObject *)n;
}

PyDoc_STRVAR(drain_doc,
             "drain(ring_address, channels, max_items, encoding=None, raw=False)"
             " -> list\n\n"
             "Consume up to max_items records from the ring at ring_address and "
             "return them as Notification objects.  channels maps record "
             "channel indices to str; encoding is a Python codec name, None for "
             "UTF-8; raw=True gives payloads as bytes, undecoded.  The caller "
             "must be the ring's only consumer.");

/* Consume up to max_items records of r as a list (empty if none). */
static PyObject *drain_ring(pglf_ring *r, PyObject *channels, Py_ssize_t max_items,
                            const char *encoding, int raw)
{
    if (max_items <= 0)
        return PyList_New(0);
    /* Count first (cheap: headers only), so the list is allocated once. */
    uint64_t pos = pglf_ring_consumer_pos(r);
    uint64_t start = pos;
    Py_ssize_t count = 0;
    while (count < max_items && pglf_ring_peek(r, &pos) != NULL)
        count++;
    PyObject *out = PyList_New(count);
    if (out == NULL)
        return NULL;
    pos = start;
    uint64_t notifies = 0;
    for (Py_ssize_t n = 0; n < count; n++) {
        uint64_t before = pos;
        const pglf_rec *h = pglf_ring_peek(r, &pos);
        PyObject *item = make_record(h, channels, encoding, raw);
        if (item == NULL) {
            /* Leave the failed record in the ring; hand out the ones before
             * (the list is cut first: only what is handed out is consumed). */
            if (n == 0) {
                Py_DECREF(out);
                return NULL;
            }
            PyObject *exc_type, *exc_value, *exc_tb;
            PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
            if (PyList_SetSlice(out, n, count, NULL) < 0) {
                Py_XDECREF(exc_type);
                Py_XDECREF(exc_value);
                Py_XDECREF(exc_tb);
                Py_DECREF(out);
                return NULL;   /* nothing consumed: all stays in the ring */
            }
            Py_XDECREF(exc_type);
            Py_XDECREF(exc_value);
            Py_XDECREF(exc_tb);
            pglf_ring_consume(r, before, notifies);
            return out;
        }
        PyList_SET_ITEM(out, n, item);
        if (h->kind == PGLF_KIND_NOTIFY)
            notifies++;
    }
    if (pos != start)
        pglf_ring_consume(r, pos, notifies);
    return out;
}

static pglf_ring *ring_at(unsigned long long addr)
{
    if (addr == 0) {
        PyErr_SetString(PyExc_ValueError, "null ring");
        return NULL;
    }
    return (pglf_ring *)(uintptr_t)addr;
}

static PyObject *records_drain(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long addr;
    PyObject *channels;
    Py_ssize_t max_items;
    const char *encoding = NULL;
    int raw = 0;
    if (!PyArg_ParseTuple(args, "KO!n|zp:drain", &addr, &PyTuple_Type, &channels,
                          &max_items, &encoding, &raw))
        return NULL;
    pglf_ring *r = ring_at(addr);
    if (r == NULL)
        return NULL;
    if (encoding && (strcmp(encoding, "utf-8") == 0 || strcmp(encoding, "utf8") == 0))
        encoding = NULL;
    return drain_ring(r, channels, max_items, encoding, raw);
}

PyDoc_STRVAR(take_doc,
             "take(ring_address, channels, max_items, timeout_ms, raw) -> list | int\n\n"
             "Like drain() with UTF-8 payloads, but when the ring is empty wait "
             "up to timeout_ms (< 0: no limit; 0: do not sleep) with the GIL "
             "released for records, then drain them: a non-empty list, or the "
             "wait's result code (PGLF_CLOSED: closed and empty, PGLF_TIMEOUT, "
             "PGLF_EINTR, PGLF_EINVAL).  One call per consumer wake-up, so no "
             "Python code runs between the wake-up and the batch.");

static PyObject *records_take(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "take() takes exactly 5 arguments");
        return NULL;
    }
    unsigned long long addr = PyLong_AsUnsignedLongLong(args[0]);
    if (addr == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    PyObject *channels = args[1];
    if (!PyTuple_Check(channels)) {
        PyErr_SetString(PyExc_TypeError, "take(): channels must be a tuple");
        return NULL;
    }
    Py_ssize_t max_items = PyLong_AsSsize_t(args[2]);
    if (max_items == -1 && PyErr_Occurred())
        return NULL;
    if (max_items <= 0) {
        /* Nothing could ever be taken: the wait would return at once. */
        PyErr_SetString(PyExc_ValueError, "take(): max_items must be >= 1");
        return NULL;
    }
    long timeout_ms = PyLong_AsLong(args[3]);
    if (timeout_ms == -1 && PyErr_Occurred())
        return NULL;
    if (timeout_ms > 0x7fffffffL)
        timeout_ms = 0x7fffffffL;
    int raw = PyObject_IsTrue(args[4]);
    if (raw < 0)
        return NULL;
    pglf_ring *r = ring_at(addr);
    if (r == NULL)
        return NULL;
    int64_t deadline = timeout_ms >= 0 ? pglf_mono_ms() + timeout_ms : -1;
    for (;;) {
        PyObject *out = drain_ring(r, channels, max_items, NULL, raw);
        if (out == NULL || PyList_GET_SIZE(out) > 0)
            return out;
        Py_DECREF(out);
        int left = -1;
        if (deadline >= 0) {
            int64_t d = deadline - pglf_mono_ms();
            left = d > 0 ? (int)d : 0;
        }
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = pglf_ring_wait(r, left);
        Py_END_ALLOW_THREADS
        if (rc == PGLF_READY)
            continue;
        if (rc == PGLF_CLOSED) {
            /* Records may have landed just before the close. */
            out = drain_ring(r, channels, max_items, NULL, raw);
            if (out == NULL || PyList_GET_SIZE(out) > 0)
                return out;
            Py_DECREF(out);
        }
        return PyLong_FromLong(rc);
    }
}

static PyMethodDef records_methods[] = {
    {"drain", records_drain, METH_VARARGS, drain_doc},
    {"take", (PyCFunction)(void (*)(void))records_take, METH_FASTCALL, take_doc},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef records_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pglisten_fast._records",
    .m_doc = "Notification type and batch drain of subscription rings.",
    .m_size = -1,
    .m_methods = records_methods,
};

PyMODINIT_FUNC PyInit__records(void)
{
    /* Objects of a previous interpreter (Py_Finalize, then Py_Initialize in
     * an embedding application) are gone: forget them. */
    freelist_len = 0;
    if (PyType_Ready(&NotificationType) < 0)
        return NULL;
    PyObject *match_args = Py_BuildValue("(sss)", "channel", "payload", "pid");
    if (match_args == NULL ||
        PyDict_SetItemString(NotificationType.tp_dict, "__match_args__",
                             match_args) < 0) {
        Py_XDECREF(match_args);
        return NULL;
    }
    Py_DECREF(match_args);
    PyType_Modified(&NotificationType);
    str_listen = PyUnicode_InternFromString("listen");
    str_reconnect = PyUnicode_InternFromString("reconnect");
    str_overflow = PyUnicode_InternFromString("overflow");
    str_empty = PyUnicode_InternFromString("");
    bytes_empty = PyBytes_FromStringAndSize(NULL, 0);
    name_channel = PyUnicode_InternFromString("channel");
    name_payload = PyUnicode_InternFromString("payload");
    name_pid = PyUnicode_InternFromString("pid");
    name_reset = PyUnicode_InternFromString("connection_reset");
    name_reason = PyUnicode_InternFromString("reason");
    name_dropped = PyUnicode_InternFromString("dropped");
    if (!str_listen || !str_reconnect || !str_overflow || !str_empty ||
        !bytes_empty || !name_channel || !name_payload || !name_pid || !name_reset ||
        !name_reason || !name_dropped)
        return NULL;
    PyObject *m = PyModule_Create(&records_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&NotificationType);
    if (PyModule_AddObject(m, "Notification", (PyObject *)&NotificationType) < 0) {
        Py_DECREF(&NotificationType);
        Py_DECREF(m);
        return NULL;
    }
    /* The layout of the rings this module drains (see pglf_ring.h). */
    if (PyModule_AddIntConstant(m, "RING_ABI", (long)pglf_ring_abi()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
