/* The LDAP short way's two innermost loops in C (ldap/fastpath.py says what they do; this
 * file only does it with fewer interpreter steps). Optional: setup.py builds it when a C
 * compiler is there, and fastpath.py falls back to the same work in Python without it.
 *
 * Why C: py-spy and perf on the shared harness's device search (64 connections, 100,000
 * devices, the server pinned to one core, 2026-12-05) put 59 % of the server's CPU in the
 * interpreter (libpython) and 20 % in the kernel; of the request's Python, matching the
 * request's bytes to a learnt shape and encoding the answer's frames were ~30 % of the
 * server's CPU. The search ran at 0.78-0.93x slapd. BENCHMARKS.md ("The read path, fifth
 * pass") has the figures with and without this module.
 *
 * No I/O, no state but the record layout (`layout`), nothing kept between calls. Every
 * input is checked; anything unexpected returns None, and the caller then takes the Python
 * road, which says what is wrong. tests/test_ldap_hot.py checks both roads answer the same
 * bytes and fuzzes `match`. Under AddressSanitizer and UBSan (built by hand with
 * `gcc -shared -fPIC -O1 -g -fsanitize=address,undefined -I/usr/include/python3.11 _hot.c`,
 * run with LD_PRELOAD of libasan and libubsan) 200,000 mutated requests and 20,000 sets of
 * records, whole and truncated, found nothing (2026-12-05).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* where a certificate record's fields lie (readmodel/records.py CERT_HEAD), set by `layout` */
static Py_ssize_t L_KIND_AT = -1, L_TRAITS_START, L_TRAITS_END, L_HEAD_SIZE, L_SERIAL_LEN_AT,
    L_DER_LEN_AT;

#define MAX_LENGTH_OCTETS 4 /* as pki/der.py */
#define SEQUENCE 0x30
#define INTEGER 0x02

/* octets of a DER definite length for n content octets */
static Py_ssize_t length_size(Py_ssize_t n)
{
    if (n < 0x80) return 1;
    if (n < 0x100) return 2;
    if (n < 0x10000) return 3;
    if (n < 0x1000000) return 4;
    return 5;
}

static unsigned char *put_length(unsigned char *p, Py_ssize_t n)
{
    if (n < 0x80) {
        *p++ = (unsigned char)n;
    } else if (n < 0x100) {
        *p++ = 0x81; *p++ = (unsigned char)n;
    } else if (n < 0x10000) {
        *p++ = 0x82; *p++ = (unsigned char)(n >> 8); *p++ = (unsigned char)n;
    } else if (n < 0x1000000) {
        *p++ = 0x83; *p++ = (unsigned char)(n >> 16); *p++ = (unsigned char)(n >> 8);
        *p++ = (unsigned char)n;
    } else {
        *p++ = 0x84; *p++ = (unsigned char)(n >> 24); *p++ = (unsigned char)(n >> 16);
        *p++ = (unsigned char)(n >> 8); *p++ = (unsigned char)n;
    }
    return p;
}

/* layout(kind_at, traits_start, traits_end, head_size, serial_len_at, der_len_at) -> None */
static PyObject *hot_layout(PyObject *self, PyObject *args)
{
    Py_ssize_t v[6];
    if (!PyArg_ParseTuple(args, "nnnnnn", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5]))
        return NULL;
    if (v[0] < 0 || v[1] < 0 || v[2] < v[1] || v[3] < v[2] || v[4] >= v[3] || v[5] + 4 > v[3]
        || v[0] >= v[3]) {
        PyErr_SetString(PyExc_ValueError, "layout: offsets outside the head");
        return NULL;
    }
    L_KIND_AT = v[0]; L_TRAITS_START = v[1]; L_TRAITS_END = v[2]; L_HEAD_SIZE = v[3];
    L_SERIAL_LEN_AT = v[4]; L_DER_LEN_AT = v[5];
    Py_RETURN_NONE;
}

/* match(data, max_pdu_size, by_length) -> (message id, query, EUI-64 value) | None
 *
 * codec.whole_message, codec.message_id and fastpath.Shapes.match in one: `data` one whole
 * LDAPMessage within `max_pdu_size` whose message id is a short positive INTEGER, and the
 * octets after that id of a learnt shape (`by_length`: length of those octets -> list of
 * (prefix, suffix, query)). */
static PyObject *hot_match(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyBytes_CheckExact(args[0]) || !PyDict_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "match(data: bytes, max_pdu_size: int, by_length: dict)");
        return NULL;
    }
    Py_ssize_t max_pdu = PyLong_AsSsize_t(args[1]);
    if (max_pdu == -1 && PyErr_Occurred()) return NULL;
    const unsigned char *d = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = PyBytes_GET_SIZE(args[0]);
    if (n < 2 || d[0] != SEQUENCE || n > max_pdu) Py_RETURN_NONE;
    Py_ssize_t at, length;
    if (d[1] & 0x80) {
        Py_ssize_t count = d[1] & 0x7F;
        if (count == 0 || count > MAX_LENGTH_OCTETS || 2 + count > n) Py_RETURN_NONE;
        length = 0;
        for (Py_ssize_t i = 0; i < count; i++) length = (length << 8) | d[2 + i];
        at = 2 + count;
    } else {
        at = 2;
        length = d[1];
    }
    if (at + length != n) Py_RETURN_NONE;
    /* the content: messageID INTEGER, short and positive */
    const unsigned char *c = d + at;
    Py_ssize_t clen = length;
    if (clen < 3 || c[0] != INTEGER) Py_RETURN_NONE;
    Py_ssize_t idlen = c[1];
    if (idlen < 1 || idlen > 4 || clen < 2 + idlen || (c[2] & 0x80)) Py_RETURN_NONE;
    long mid = 0;
    for (Py_ssize_t i = 0; i < idlen; i++) mid = (mid << 8) | c[2 + i];
    const unsigned char *key = c + 2 + idlen;
    Py_ssize_t klen = clen - 2 - idlen;
    PyObject *klen_obj = PyLong_FromSsize_t(klen);
    if (klen_obj == NULL) return NULL;
    PyObject *bucket = PyDict_GetItemWithError(args[2], klen_obj); /* borrowed */
    Py_DECREF(klen_obj);
    if (bucket == NULL) {
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    if (!PyList_CheckExact(bucket)) Py_RETURN_NONE;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(bucket); i++) {
        PyObject *item = PyList_GET_ITEM(bucket, i);
        if (!PyTuple_CheckExact(item) || PyTuple_GET_SIZE(item) != 3) continue;
        PyObject *prefix = PyTuple_GET_ITEM(item, 0), *suffix = PyTuple_GET_ITEM(item, 1);
        if (!PyBytes_CheckExact(prefix) || !PyBytes_CheckExact(suffix)) continue;
        Py_ssize_t plen = PyBytes_GET_SIZE(prefix), slen = PyBytes_GET_SIZE(suffix);
        if (plen + slen > klen) continue;
        if (memcmp(key, PyBytes_AS_STRING(prefix), plen) != 0) continue;
        if (memcmp(key + klen - slen, PyBytes_AS_STRING(suffix), slen) != 0) continue;
        PyObject *value = PyBytes_FromStringAndSize((const char *)key + plen, klen - plen - slen);
        if (value == NULL) return NULL;
        PyObject *query = PyTuple_GET_ITEM(item, 2);
        PyObject *out = Py_BuildValue("(lON)", mid, query, value);
        return out;
    }
    Py_RETURN_NONE;
}

static int hexval(unsigned char ch)
{
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* dashed_eui64(value) -> the 8 octets | None: `00-DB-12-34-56-78-9A-BC` (either case) only;
 * anything else None (fastpath._eui64 then normalises it the general way). */
static PyObject *hot_dashed_eui64(PyObject *self, PyObject *arg)
{
    if (!PyBytes_CheckExact(arg) || PyBytes_GET_SIZE(arg) != 23) Py_RETURN_NONE;
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(arg);
    unsigned char out[8];
    for (int i = 0; i < 8; i++) {
        const unsigned char *p = s + 3 * i;
        int hi = hexval(p[0]), lo = hexval(p[1]);
        if (hi < 0 || lo < 0 || (i < 7 && p[2] != '-')) Py_RETURN_NONE;
        out[i] = (unsigned char)(hi << 4 | lo);
    }
    return PyBytes_FromStringAndSize((const char *)out, 8);
}

typedef struct {
    const unsigned char *serial, *der;
    Py_ssize_t serial_len, der_len, dn_len, op_content, op_size;
} Piece;

#define STACK_PIECES 8

/* frames(mid, found, kind, accepts, name, dn_start, tail, done) ->
 *     (bytes, entries) | None
 *
 * fastpath.FastSearch._answer_raw for a search that sends userCertificate alone and never
 * returns the subject entry, framed as responses.frames does, the SearchResultDone `done`
 * (a protocolOp) last: `found` the device's records as stored, `kind` the records' kind,
 * `accepts` the memo of verdicts on a record's traits (None: the filter tests nothing a record
 * holds), `name` the attribute's name element, each entry's DN `dn_start` + serial + `tail`.
 * None when a record is not of `kind`, its traits not yet judged, or it is malformed. */
static PyObject *hot_frames(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 8 || !PyList_CheckExact(args[1]) || !PyBytes_CheckExact(args[4])
        || !PyBytes_CheckExact(args[5]) || !PyBytes_CheckExact(args[6])
        || !PyBytes_CheckExact(args[7]) || (args[3] != Py_None && !PyDict_CheckExact(args[3]))) {
        PyErr_SetString(PyExc_TypeError, "frames(mid, found: list, kind, accepts: dict | None,"
                        " name: bytes, dn_start: bytes, tail: bytes, done: bytes)");
        return NULL;
    }
    if (L_KIND_AT < 0) {
        PyErr_SetString(PyExc_RuntimeError, "frames: layout() not called");
        return NULL;
    }
    long mid = PyLong_AsLong(args[0]);
    if (mid == -1 && PyErr_Occurred()) return NULL;
    long kind = PyLong_AsLong(args[2]);
    if (kind == -1 && PyErr_Occurred()) return NULL;
    if (mid < 0 || mid > 0x7FFFFFFFL) Py_RETURN_NONE;
    PyObject *found = args[1], *accepts = args[3];
    const unsigned char *name = (const unsigned char *)PyBytes_AS_STRING(args[4]);
    const unsigned char *dn_start = (const unsigned char *)PyBytes_AS_STRING(args[5]);
    const unsigned char *tail = (const unsigned char *)PyBytes_AS_STRING(args[6]);
    const unsigned char *done = (const unsigned char *)PyBytes_AS_STRING(args[7]);
    Py_ssize_t name_len = PyBytes_GET_SIZE(args[4]), start_len = PyBytes_GET_SIZE(args[5]),
               tail_len = PyBytes_GET_SIZE(args[6]), done_len = PyBytes_GET_SIZE(args[7]);

    /* the message id's INTEGER element, as ber.enc_int */
    unsigned char mid_enc[6];
    Py_ssize_t mid_len;
    if (mid < 0x80) {
        mid_enc[0] = INTEGER; mid_enc[1] = 1; mid_enc[2] = (unsigned char)mid; mid_len = 3;
    } else {
        int nbytes = mid < 0x8000L ? 2 : mid < 0x800000L ? 3 : 4;
        mid_enc[0] = INTEGER; mid_enc[1] = (unsigned char)nbytes;
        for (int i = 0; i < nbytes; i++)
            mid_enc[2 + i] = (unsigned char)(mid >> (8 * (nbytes - 1 - i)));
        mid_len = 2 + nbytes;
    }

    Py_ssize_t count = PyList_GET_SIZE(found);
    Piece stack[STACK_PIECES];
    Piece *pieces = stack;
    if (count > STACK_PIECES) {
        pieces = PyMem_Malloc(sizeof(Piece) * (size_t)count);
        if (pieces == NULL) return PyErr_NoMemory();
    }
    PyObject *result = NULL;
    Py_ssize_t kept = 0, total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *value = PyList_GET_ITEM(found, i);
        if (!PyBytes_CheckExact(value)) goto fallback;
        const unsigned char *v = (const unsigned char *)PyBytes_AS_STRING(value);
        Py_ssize_t vlen = PyBytes_GET_SIZE(value);
        if (vlen < L_HEAD_SIZE || v[L_KIND_AT] != kind) goto fallback;
        if (accepts != Py_None) {
            PyObject *traits = PyBytes_FromStringAndSize((const char *)v + L_TRAITS_START,
                                                         L_TRAITS_END - L_TRAITS_START);
            if (traits == NULL) goto error;
            PyObject *verdict = PyDict_GetItemWithError(accepts, traits); /* borrowed */
            Py_DECREF(traits);
            if (verdict == NULL) {
                if (PyErr_Occurred()) goto error;
                goto fallback; /* not judged yet: Python judges it and memoises */
            }
            int yes = PyObject_IsTrue(verdict);
            if (yes < 0) goto error;
            if (!yes) continue;
        }
        Py_ssize_t serial_len = v[L_SERIAL_LEN_AT];
        const unsigned char *dl = v + L_DER_LEN_AT;
        Py_ssize_t der_len = (Py_ssize_t)((uint32_t)dl[0] << 24 | (uint32_t)dl[1] << 16
                                          | (uint32_t)dl[2] << 8 | dl[3]);
        if (der_len > vlen || L_HEAD_SIZE + serial_len > vlen - der_len) goto fallback;
        Piece *p = &pieces[kept++];
        p->serial = v + L_HEAD_SIZE;
        p->serial_len = serial_len;
        p->der = v + vlen - der_len;
        p->der_len = der_len;
        p->dn_len = start_len + serial_len + tail_len;
        /* responses.single_value_op's sizes */
        Py_ssize_t set_size = 1 + length_size(der_len) + der_len;
        Py_ssize_t attr_size = name_len + 1 + length_size(set_size) + set_size;
        Py_ssize_t attrs_size = 1 + length_size(attr_size) + attr_size;
        p->op_content = 2 + length_size(p->dn_len) + p->dn_len + length_size(attrs_size)
                        + attrs_size;
        p->op_size = 1 + length_size(p->op_content) + p->op_content;
        total += 1 + length_size(mid_len + p->op_size) + mid_len + p->op_size;
    }
    total += 1 + length_size(mid_len + done_len) + mid_len + done_len;
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL) goto error;
    unsigned char *w = (unsigned char *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < kept; i++) {
        Piece *p = &pieces[i];
        *w++ = SEQUENCE;
        w = put_length(w, mid_len + p->op_size);
        memcpy(w, mid_enc, (size_t)mid_len); w += mid_len;
        *w++ = 0x64; /* SearchResultEntry */
        w = put_length(w, p->op_content);
        *w++ = 0x04;
        w = put_length(w, p->dn_len);
        memcpy(w, dn_start, (size_t)start_len); w += start_len;
        memcpy(w, p->serial, (size_t)p->serial_len); w += p->serial_len;
        memcpy(w, tail, (size_t)tail_len); w += tail_len;
        Py_ssize_t set_size = 1 + length_size(p->der_len) + p->der_len;
        Py_ssize_t attr_size = name_len + 1 + length_size(set_size) + set_size;
        Py_ssize_t attrs_size = 1 + length_size(attr_size) + attr_size;
        *w++ = SEQUENCE;
        w = put_length(w, attrs_size);
        *w++ = SEQUENCE;
        w = put_length(w, attr_size);
        memcpy(w, name, (size_t)name_len); w += name_len;
        *w++ = 0x31;
        w = put_length(w, set_size);
        *w++ = 0x04;
        w = put_length(w, p->der_len);
        memcpy(w, p->der, (size_t)p->der_len); w += p->der_len;
    }
    *w++ = SEQUENCE;
    w = put_length(w, mid_len + done_len);
    memcpy(w, mid_enc, (size_t)mid_len); w += mid_len;
    memcpy(w, done, (size_t)done_len); w += done_len;
    if (w != (unsigned char *)PyBytes_AS_STRING(out) + total) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_SystemError, "frames: size mismatch");
        goto error;
    }
    result = Py_BuildValue("(Nn)", out, kept);
    goto end;
fallback:
    result = Py_NewRef(Py_None);
    goto end;
error:
    result = NULL;
end:
    if (pieces != stack) PyMem_Free(pieces);
    return result;
}

static PyMethodDef methods[] = {
    {"layout", hot_layout, METH_VARARGS, "Set where a certificate record's fields lie."},
    {"match", (PyCFunction)(void (*)(void))hot_match, METH_FASTCALL,
     "(message id, query, EUI-64 value) of a whole request of a learnt shape, else None."},
    {"dashed_eui64", hot_dashed_eui64, METH_O, "The 8 octets of a dashed EUI-64, else None."},
    {"frames", (PyCFunction)(void (*)(void))hot_frames, METH_FASTCALL,
     "A device's certificates answered as framed SearchResultEntries and the done."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_hot", "The LDAP short way's innermost loops (see _hot.c).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__hot(void) { return PyModule_Create(&module); }
