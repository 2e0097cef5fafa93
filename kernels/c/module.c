/* fastmerge._cmerge: the Python face of the C CPU kernels (kernels.c).
 *
 * Plain CPython C API over the buffer protocol: tensors arrive as C-contiguous buffers
 * (numpy views of torch CPU tensors; fp16/bf16 as 16-bit integer views), dtypes as codes
 * F32 / F16 / BF16. Every argument is checked here -- buffer byte sizes against n and N,
 * dtype codes, 1 <= n <= MAX_MODELS, writability, aliasing -- and a ValueError says what
 * is wrong before any memory is touched. The compute runs without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <string.h>

#include "gram.h"
#include "kernels.h"
#include "philox.h"

/* ------------------------------------------------------------------------------------ */
/* buffer bookkeeping: every view taken is released on every exit path                   */

typedef struct {
    Py_buffer views[FM_MAX_MODELS + 8];
    int count;
} bufset;

static void bufset_release(bufset *bs)
{
    for (int k = 0; k < bs->count; k++) PyBuffer_Release(&bs->views[k]);
    bs->count = 0;
}

/* A wrapper's result once its kernel has run: the buffers released, then None, or
 * MemoryError when the kernel could not allocate its scratch (rc != 0). */
static PyObject *kernel_done(bufset *bs, int rc)
{
    bufset_release(bs);
    if (rc != 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* Take a C-contiguous view of `obj` holding exactly `count` items of `itemsize` bytes. */
static Py_buffer *take_buffer(bufset *bs, PyObject *obj, const char *what, long long count,
                              int itemsize, int writable)
{
    Py_buffer *v = &bs->views[bs->count];
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (!PyObject_CheckBuffer(obj)) {
        PyErr_Format(PyExc_ValueError, "%s: expected a buffer (e.g. a numpy array), got %.80s",
                     what, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    if (PyObject_GetBuffer(obj, v, flags) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: need a C-contiguous%s buffer", what,
                     writable ? ", writable" : "");
        return NULL;
    }
    bs->count++;
    if (v->itemsize != itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: items of %d bytes expected, buffer has %zd-byte "
                     "items (format %.10s)", what, itemsize, v->itemsize,
                     v->format ? v->format : "B");
        return NULL;
    }
    if (v->len != (Py_ssize_t)(count * itemsize)) {
        PyErr_Format(PyExc_ValueError, "%s: %lld items expected, buffer holds %zd", what,
                     count, v->len / itemsize);
        return NULL;
    }
    return v;
}

static int overlaps(const void *p, size_t plen, const void *q, size_t qlen)
{
    const char *a = p, *b = q;
    return plen && qlen && a < b + qlen && b < a + plen;
}

/* format of an integer buffer: int64 ('q' / 'l', 8-byte items) or int32 ('i'), optionally
 * prefixed by '<' '=' '@' */
static int check_int(const Py_buffer *v, const char *what, int itemsize)
{
    const char *f = v->format ? v->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    const int ok = itemsize == 8 ? (*f == 'q' || *f == 'l') : *f == 'i';
    if (!(ok && f[1] == '\0')) {
        PyErr_Format(PyExc_ValueError, "%s: an int%d buffer is needed, got format %.10s",
                     what, 8 * itemsize, v->format ? v->format : "B");
        return -1;
    }
    return 0;
}

/* A writable output of `count` int32 / int64 items that overlaps no buffer taken before. */
static Py_buffer *take_int_output(bufset *bs, PyObject *obj, const char *what, long long count,
                                  int itemsize)
{
    Py_buffer *v = take_buffer(bs, obj, what, count, itemsize, 1);
    if (!v || check_int(v, what, itemsize)) return NULL;
    for (int k = 0; k < bs->count - 1; k++)
        if (overlaps(v->buf, (size_t)v->len, bs->views[k].buf, (size_t)bs->views[k].len)) {
            PyErr_Format(PyExc_ValueError, "%s: overlaps another buffer", what);
            return NULL;
        }
    return v;
}

/* out may be exactly base or a model (in place: each block is read before it is written)
 * but must not partially overlap any of them; -1 with a ValueError when it does. */
static int check_out_alias(const Py_buffer *ov, const void *base, int bdt,
                           const void *const *models, int mdt, int n, long long N)
{
    for (int k = -1; k < n; k++) {
        const void *in = k < 0 ? base : models[k];
        const size_t len = (size_t)N * fm_dtype_size(k < 0 ? bdt : mdt);
        if (in && overlaps(in, len, ov->buf, (size_t)ov->len) &&
            !(in == ov->buf && len == (size_t)ov->len)) {
            PyErr_Format(PyExc_ValueError, "out: partially overlaps %s (only out == base or "
                         "out == a model of the same dtype is allowed)", k < 0 ? "base" : "a model");
            return -1;
        }
    }
    return 0;
}

static int check_dtype(int dt, const char *what)
{
    if (dt != FM_F32 && dt != FM_F16 && dt != FM_BF16) {
        PyErr_Format(PyExc_ValueError, "%s: unknown dtype code %d (F32=%d, F16=%d, BF16=%d)",
                     what, dt, FM_F32, FM_F16, FM_BF16);
        return -1;
    }
    return 0;
}

static int check_sizes(int n, long long N)
{
    if (n < 1 || n > FM_MAX_MODELS) {
        PyErr_Format(PyExc_ValueError, "n (number of models) must be 1..%d, got %d",
                     FM_MAX_MODELS, n);
        return -1;
    }
    /* every byte count computed later (n * N * 4) must fit a Py_ssize_t */
    if (N < 0 || N > (long long)(PY_SSIZE_T_MAX / 4 / n)) {
        PyErr_Format(PyExc_ValueError, "N (entries per tensor) must be 0..%lld, got %lld",
                     (long long)(PY_SSIZE_T_MAX / 4 / n), N);
        return -1;
    }
    return 0;
}

/* models: one buffer of n*N items (rows) or a sequence of n buffers of N items */
static int take_models(bufset *bs, PyObject *obj, int n, long long N, int dt,
                       const void **ptrs)
{
    const int size = fm_dtype_size(dt);
    if (PyObject_CheckBuffer(obj)) {
        Py_buffer *v = take_buffer(bs, obj, "models", (long long)n * N, size, 0);
        if (!v) return -1;
        for (int i = 0; i < n; i++) ptrs[i] = (const char *)v->buf + (size_t)i * N * size;
        return 0;
    }
    if (!PySequence_Check(obj) || PyUnicode_Check(obj) || PyBytes_Check(obj)) {
        PyErr_Format(PyExc_ValueError, "models: expected a buffer of n*N items or a sequence "
                     "of n buffers, got %.80s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    Py_ssize_t len = PySequence_Size(obj);
    if (len < 0) return -1;
    if (len != n) {
        PyErr_Format(PyExc_ValueError, "models: sequence of %zd buffers, n = %d", len, n);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        char what[32];
        PyObject *item = PySequence_GetItem(obj, i);
        if (!item) return -1;
        snprintf(what, sizeof what, "models[%d]", i);
        Py_buffer *v = take_buffer(bs, item, what, N, size, 0);
        Py_DECREF(item);   /* the view holds its own reference to the exporter */
        if (!v) return -1;
        ptrs[i] = v->buf;
    }
    return 0;
}

/* base (N items) and models (as take_models): the inputs of the passes over keys */
static int take_inputs(bufset *bs, PyObject *base_o, PyObject *models_o, int n, long long N,
                       int bdt, int mdt, const void **base, const void **models)
{
    Py_buffer *bv = take_buffer(bs, base_o, "base", N, fm_dtype_size(bdt), 0);
    if (!bv) return -1;
    *base = bv->buf;
    return take_models(bs, models_o, n, N, mdt, models);
}

/* ValueError "<what>[i] = <x>: <problem>" (PyErr_Format has no float conversions) */
static void bad_number(const char *what, int i, double x, const char *problem)
{
    char *repr = PyOS_double_to_string(x, 'r', 0, 0, NULL);
    if (i >= 0) PyErr_Format(PyExc_ValueError, "%s[%d] = %s: %s", what, i, repr ? repr : "?", problem);
    else PyErr_Format(PyExc_ValueError, "%s = %s: %s", what, repr ? repr : "?", problem);
    PyMem_Free(repr);
}

/* n numbers from a sequence into dst (fp64); finite_only: reject NaN / inf, else reject
 * only NaN. *sum (if given) = Σ dst[i] in order from 0.0. */
static int take_doubles(PyObject *obj, const char *what, int n, double *dst, double *sum,
                        int finite_only)
{
    PyObject *seq = PySequence_Fast(obj, "");
    if (!seq) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: expected a sequence of %d floats, got %.80s",
                     what, n, Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (PySequence_Fast_GET_SIZE(seq) != n) {
        PyErr_Format(PyExc_ValueError, "%s: %d values expected (one per model), got %zd",
                     what, n, PySequence_Fast_GET_SIZE(seq));
        Py_DECREF(seq);
        return -1;
    }
    double total = 0.0;
    for (int i = 0; i < n; i++) {
        double x = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
        if (x == -1.0 && PyErr_Occurred()) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "%s[%d]: not a number", what, i);
            Py_DECREF(seq);
            return -1;
        }
        if (x != x || (finite_only && !(fabs(x) <= DBL_MAX))) {
            bad_number(what, i, x, finite_only ? "must be finite" : "must be a number (not NaN)");
            Py_DECREF(seq);
            return -1;
        }
        dst[i] = x;
        total += x;
    }
    Py_DECREF(seq);
    if (sum) *sum = total;
    return 0;
}

/* n thresholds (fp32 values; +inf: keep / protect none) into dst, +inf stored as NaN so
 * that no comparison holds; None: every entry of dst = none_value. */
static int take_thresholds(PyObject *obj, const char *what, int n, float *dst, float none_value)
{
    double v[FM_MAX_MODELS];
    if (obj == Py_None) {
        for (int i = 0; i < n; i++) dst[i] = none_value;
        return 0;
    }
    if (take_doubles(obj, what, n, v, NULL, 0)) return -1;
    for (int i = 0; i < n; i++) {
        if (v[i] < 0.0 || (v[i] != INFINITY && (double)(float)v[i] != v[i])) {
            bad_number(what, i, v[i], "must be an fp32 value >= 0 or inf");
            return -1;
        }
        dst[i] = v[i] == INFINITY ? NAN : (float)v[i];
    }
    return 0;
}

static int resolve_threads(int threads)
{
    if (threads < 0) {
        PyErr_Format(PyExc_ValueError, "threads must be >= 0 (0: the module default), got %d",
                     threads);
        return -1;
    }
    return threads > 0 ? threads : fm_get_num_threads();
}

/* ------------------------------------------------------------------------------------ */

PyDoc_STRVAR(histogram_doc,
"histogram(base, models, n, N, base_dtype, models_dtype, prefixes, level, out, *, threads=0)\n"
"--\n\n"
"Radix-select histogram of fastmerge.kernel_api: for model i, slot j, count the digit\n"
"(key >> SHIFT[level]) & (2**DIGIT_BITS[level] - 1) of every key = bits(|f32(models[i]) -\n"
"f32(base)|) with key >> (SHIFT[level] + DIGIT_BITS[level]) == prefixes[i, j] (-1: off).\n"
"base: N items; models: n*N items or n buffers of N; prefixes: n*2 int32/int64;\n"
"out: writable n*2*NBINS int64, overwritten. threads=0 uses get_num_threads().");

static PyObject *py_histogram(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"base", "models", "n", "N", "base_dtype", "models_dtype",
                             "prefixes", "level", "out", "threads", NULL};
    PyObject *base_o, *models_o, *prefixes_o, *out_o;
    int n, bdt, mdt, level, threads = 0;
    long long N;
    bufset bs = {.count = 0};
    fm_hist_args a;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOiLiiOiO|$i", kwlist, &base_o, &models_o, &n,
                                     &N, &bdt, &mdt, &prefixes_o, &level, &out_o, &threads))
        return NULL;
    memset(&a, 0, sizeof a);
    if (check_sizes(n, N) || check_dtype(bdt, "base_dtype") || check_dtype(mdt, "models_dtype"))
        return NULL;
    if (level < 0 || level >= FM_LEVELS) {
        PyErr_Format(PyExc_ValueError, "level must be 0..%d, got %d", FM_LEVELS - 1, level);
        return NULL;
    }
    if ((a.threads = resolve_threads(threads)) < 0) return NULL;
    a.n = n;
    a.N = N;
    a.level = level;
    a.base_dt = bdt;
    a.models_dt = mdt;

    if (take_inputs(&bs, base_o, models_o, n, N, bdt, mdt, &a.base, a.models)) goto fail;

    /* prefixes: int32 or int64, n*2 */
    {
        Py_buffer *pv = &bs.views[bs.count];
        if (!PyObject_CheckBuffer(prefixes_o) ||
            PyObject_GetBuffer(prefixes_o, pv, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "prefixes: need a C-contiguous int32/int64 buffer");
            goto fail;
        }
        bs.count++;
        const char *f = pv->format ? pv->format : "B";
        if (*f == '<' || *f == '=' || *f == '@') f++;
        const int is_int = strchr("ilq", *f) != NULL && f[1] == '\0';
        if (!is_int || (pv->itemsize != 4 && pv->itemsize != 8) ||
            pv->len != (Py_ssize_t)n * 2 * pv->itemsize) {
            PyErr_Format(PyExc_ValueError, "prefixes: %d int32/int64 items ([n, 2]) expected, "
                         "got %zd bytes of format %.10s", n * 2, pv->len, pv->format);
            goto fail;
        }
        for (int i = 0; i < n; i++)
            for (int j = 0; j < 2; j++) {
                const int k = 2 * i + j;
                const int64_t p = pv->itemsize == 4 ? ((const int32_t *)pv->buf)[k]
                                                    : ((const int64_t *)pv->buf)[k];
                if (p < -1) {
                    PyErr_Format(PyExc_ValueError, "prefixes[%d, %d] = %lld: must be >= 0 or "
                                 "-1 (slot off)", i, j, (long long)p);
                    goto fail;
                }
                a.prefix[i][j] = p;
            }
    }

    Py_buffer *ov = take_int_output(&bs, out_o, "out", (long long)n * 2 * FM_NBINS, 8);
    if (!ov) goto fail;
    a.hist = ov->buf;

    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fm_histogram(&a);
    Py_END_ALLOW_THREADS
    return kernel_done(&bs, rc);
fail:
    bufset_release(&bs);
    return NULL;
}

PyDoc_STRVAR(bracket_doc,
"bracket(base, models, n, N, base_dtype, models_dtype, bounds, cand, cap, counts, *, threads=0)\n"
"--\n\n"
"Counting pass of bracketed selection (fastmerge.kernel_api): for model i, slot j with\n"
"bounds[i, j] = (lo, hi) and key = bits(|f32(models[i]) - f32(base)|), counts[i, j] =\n"
"(#keys > hi, #keys with lo <= key <= hi) and cand[i, j, :min(inside, cap)] = keys inside,\n"
"in no particular order. lo = -1: slot off. bounds: n*2*2 int64; cand: writable n*2*cap\n"
"int32; counts: writable n*2*2 int64, overwritten.");

static PyObject *py_bracket(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"base", "models", "n", "N", "base_dtype", "models_dtype",
                             "bounds", "cand", "cap", "counts", "threads", NULL};
    PyObject *base_o, *models_o, *bounds_o, *cand_o, *counts_o;
    int n, bdt, mdt, threads = 0;
    long long N, cap;
    bufset bs = {.count = 0};
    fm_bracket_args a;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOiLiiOOLO|$i", kwlist, &base_o, &models_o, &n,
                                     &N, &bdt, &mdt, &bounds_o, &cand_o, &cap, &counts_o,
                                     &threads))
        return NULL;
    memset(&a, 0, sizeof a);
    if (check_sizes(n, N) || check_dtype(bdt, "base_dtype") || check_dtype(mdt, "models_dtype"))
        return NULL;
    if (cap < 0 || cap > (long long)(PY_SSIZE_T_MAX / 8 / n)) {
        PyErr_Format(PyExc_ValueError, "cap must be 0..%lld, got %lld",
                     (long long)(PY_SSIZE_T_MAX / 8 / n), cap);
        return NULL;
    }
    if ((a.threads = resolve_threads(threads)) < 0) return NULL;
    a.n = n;
    a.N = N;
    a.base_dt = bdt;
    a.models_dt = mdt;
    a.cap = cap;

    if (take_inputs(&bs, base_o, models_o, n, N, bdt, mdt, &a.base, a.models)) goto fail;

    Py_buffer *qv = take_buffer(&bs, bounds_o, "bounds", (long long)n * 4, 8, 0);
    if (!qv || check_int(qv, "bounds", 8)) goto fail;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < 2; j++) {
            const int64_t lo = ((const int64_t *)qv->buf)[4 * i + 2 * j];
            const int64_t hi = ((const int64_t *)qv->buf)[4 * i + 2 * j + 1];
            if (lo >= 0 && !(lo <= hi && hi <= (int64_t)UINT32_MAX)) {
                PyErr_Format(PyExc_ValueError, "bounds[%d, %d] = (%lld, %lld): need 0 <= lo <= "
                             "hi < 2**32, or lo = -1 (slot off)", i, j, (long long)lo,
                             (long long)hi);
                goto fail;
            }
            if (lo < -1) {
                PyErr_Format(PyExc_ValueError, "bounds[%d, %d]: lo = %lld, must be >= 0 or -1 "
                             "(slot off)", i, j, (long long)lo);
                goto fail;
            }
            a.lo[i][j] = lo;
            a.hi[i][j] = hi;
        }

    Py_buffer *cv = take_int_output(&bs, cand_o, "cand", (long long)n * 2 * cap, 4);
    if (!cv) goto fail;
    a.cand = cv->buf;
    Py_buffer *ov = take_int_output(&bs, counts_o, "counts", (long long)n * 4, 8);
    if (!ov) goto fail;
    a.counts = ov->buf;

    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fm_bracket(&a);
    Py_END_ALLOW_THREADS
    return kernel_done(&bs, rc);
fail:
    bufset_release(&bs);
    return NULL;
}

/* key: an int in [0, 2^64) split into Philox's (k0 = low 32 bits, k1 = high 32 bits) */
static int take_key(PyObject *obj, uint32_t key[2])
{
    if (obj == Py_None) {
        key[0] = key[1] = 0;
        return 0;
    }
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_ValueError, "key: expected an int in [0, 2**64), got %.80s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    const unsigned long long k = PyLong_AsUnsignedLongLong(obj);
    if (k == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "key: must be an int in [0, 2**64)");
        return -1;
    }
    key[0] = (uint32_t)k;
    key[1] = (uint32_t)(k >> 32);
    return 0;
}

/* drop: n ints T_i in [0, 2^32] into thr / all (T_i = 2^32: every entry kept) */
static int take_drop(PyObject *obj, int n, uint32_t *thr, uint32_t *all)
{
    PyObject *seq = PySequence_Fast(obj, "");
    if (!seq) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "drop: expected a sequence of %d ints, got %.80s", n,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (PySequence_Fast_GET_SIZE(seq) != n) {
        PyErr_Format(PyExc_ValueError, "drop: %d values expected (one per model), got %zd", n,
                     PySequence_Fast_GET_SIZE(seq));
        Py_DECREF(seq);
        return -1;
    }
    for (int i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        long long v = PyLong_Check(item) ? PyLong_AsLongLong(item) : -1;
        if (v == -1 && PyErr_Occurred()) PyErr_Clear();
        if (!PyLong_Check(item) || v < 0 || v > (1LL << 32)) {
            PyErr_Format(PyExc_ValueError, "drop[%d]: must be an int T_i in [0, 2**32]", i);
            Py_DECREF(seq);
            return -1;
        }
        all[i] = v == (1LL << 32);
        thr[i] = all[i] ? 0u : (uint32_t)v;
    }
    Py_DECREF(seq);
    return 0;
}

PyDoc_STRVAR(merge_doc,
"merge(base, models, out, n, N, base_dtype, models_dtype, out_dtype, on_base, elect,\n"
"      normalize, weights, t, u, scale, counts, *, threads=0, drop=None, key=0, offset=0,\n"
"      vote_weights=None, h=None, keep=None, keep_rescale=False, rank_keep=None, rank_len=0)\n"
"--\n\n"
"The fused pass of fastmerge.kernel_api (docs/spec.md 4-7, 9) writing out (the fp64\n"
"result rounded once, to nearest even) and counts (writable n*7 int64, overwritten,\n"
"kernel_api.COUNTERS order). on_base: x_i = f32(models[i]) - f32(base) and out = base +\n"
"scale*m (else x_i = models[i], out = m; base may be None). elect: ELECT_NONE / ELECT_SUM /\n"
"ELECT_COUNT. weights: n floats; t: n fp32 thresholds or None (no trim; an election\n"
"needs t or a drop); u: n or None (no slack; slack needs an election): prot_i = |x_i| >=\n"
"u_i is always kept and weighs weights[i] (docs/spec.md 4a). +inf keeps / protects none.\n"
"out may be base or a model buffer itself (same dtype) but must not partially overlap\n"
"any input.\n"
"DARE (docs/spec.md 8a): drop = n ints T_i in [0, 2**32] replaces the trim (t and h must\n"
"be None): kept_i = r_i(offset + j) < T_i, r from Philox4x32-10 under key (an int in\n"
"[0, 2**64)); offset: the global index of entry 0. vote_weights: n floats c_i, x_i's\n"
"factor in sum votes and in D for entries not protected (None: the weights).\n"
"h (breadcrumbs, docs/spec.md 8b; needs t): the trim's exclusive upper bounds h_i:\n"
"kept_i = t_i <= |x_i| < h_i (+inf: no upper bound).\n"
"keep (DELLA, docs/spec.md 8d): an int64 buffer [n, N] of per-entry T_i(g) in [0, 2**32]\n"
"in place of drop: kept_i = r_i(offset + j) < T_i(j); keep_rescale: c_i(j) =\n"
"(w_i * 2**32) / T_i(j) (0 when T = 0), else w_i.\n"
"rank_keep (DELLA with its rank stage fused, docs/spec.md 8d; needs on_base): an int64\n"
"buffer [n, rank_len] of T_i(rho) per rank rho in [0, 2**32], in place of keep: the N\n"
"entries are rows of rank_len (N % rank_len == 0, rank_len < 2**31) and T_i(j) =\n"
"rank_keep[i, rank of j in its row by ascending bits(|tau_i|), ties by index].");

static PyObject *py_merge(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"base", "models", "out", "n", "N", "base_dtype", "models_dtype",
                             "out_dtype", "on_base", "elect", "normalize", "weights", "t", "u",
                             "scale", "counts", "threads", "drop", "key", "offset",
                             "vote_weights", "h", "keep", "keep_rescale", "rank_keep",
                             "rank_len", NULL};
    PyObject *base_o, *models_o, *out_o, *w_o, *t_o, *u_o, *counts_o;
    PyObject *drop_o = Py_None, *key_o = Py_None, *cw_o = Py_None, *h_o = Py_None;
    PyObject *keep_o = Py_None, *rank_o = Py_None;
    int n, bdt, mdt, odt, on_base, elect, normalize, threads = 0, keep_rescale = 0;
    long long N, offset = 0, rank_len = 0;
    double scale;
    bufset bs = {.count = 0};
    fm_merge_args a;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOiLiiipipOOOdO|$iOOLOOOpOL", kwlist, &base_o,
                                     &models_o, &out_o, &n, &N, &bdt, &mdt, &odt, &on_base,
                                     &elect, &normalize, &w_o, &t_o, &u_o, &scale, &counts_o,
                                     &threads, &drop_o, &key_o, &offset, &cw_o, &h_o, &keep_o,
                                     &keep_rescale, &rank_o, &rank_len))
        return NULL;
    memset(&a, 0, sizeof a);
    if (check_sizes(n, N) || check_dtype(mdt, "models_dtype") || check_dtype(odt, "out_dtype"))
        return NULL;
    if (elect < FM_ELECT_NONE || elect > FM_ELECT_COUNT) {
        PyErr_Format(PyExc_ValueError, "elect must be ELECT_NONE, ELECT_SUM or ELECT_COUNT, "
                     "got %d", elect);
        return NULL;
    }
    if ((keep_o != Py_None) + (rank_o != Py_None) + (drop_o != Py_None) > 1) {
        PyErr_SetString(PyExc_ValueError, "keep (per-entry thresholds), rank_keep (per-rank "
                        "thresholds) and drop replace one another: give one");
        return NULL;
    }
    if (rank_o != Py_None && (!on_base || rank_len < 1 || rank_len > INT32_MAX ||
                              N % rank_len != 0)) {
        PyErr_Format(PyExc_ValueError, "rank_keep needs on_base and rows of rank_len in "
                     "[1, 2**31) that divide N, got rank_len %lld for N %lld", rank_len, N);
        return NULL;
    }
    if (keep_o != Py_None) drop_o = keep_o;     /* a drop either way (checks below) */
    if (rank_o != Py_None) drop_o = rank_o;
    if (elect != FM_ELECT_NONE && t_o == Py_None && drop_o == Py_None) {
        PyErr_SetString(PyExc_ValueError, "a sign election needs trim thresholds t (0: keep all) "
                        "or a drop");
        return NULL;
    }
    if (drop_o != Py_None && (t_o != Py_None || h_o != Py_None)) {
        PyErr_SetString(PyExc_ValueError, "a random drop excludes trim thresholds (t, h)");
        return NULL;
    }
    if (offset < 0 || offset > INT64_MAX - N) {
        PyErr_Format(PyExc_ValueError, "offset must be 0..2**63-1-N, got %lld", offset);
        return NULL;
    }
    if (h_o != Py_None && t_o == Py_None) {
        PyErr_SetString(PyExc_ValueError, "an upper trim bound h (breadcrumbs) needs the "
                        "lower thresholds t");
        return NULL;
    }
    if (elect == FM_ELECT_NONE && u_o != Py_None) {
        PyErr_SetString(PyExc_ValueError, "slack thresholds u need a sign election");
        return NULL;
    }
    if (on_base ? (base_o == Py_None || check_dtype(bdt, "base_dtype") != 0) : base_o != Py_None) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, on_base ? "on_base needs a base buffer"
                                                      : "base must be None when on_base is false");
        return NULL;
    }
    if (!(fabs(scale) <= DBL_MAX)) {
        bad_number("scale", -1, scale, "must be finite");
        return NULL;
    }
    if ((a.threads = resolve_threads(threads)) < 0) return NULL;
    if (take_doubles(w_o, "weights", n, a.w, &a.wsum, 1)) return NULL;
    if (take_thresholds(t_o, "t", n, a.t, 0.f) || take_thresholds(u_o, "u", n, a.u, NAN) ||
        take_thresholds(h_o, "h", n, a.h, NAN))
        return NULL;
    if (cw_o == Py_None) memcpy(a.cw, a.w, sizeof a.cw);
    else if (take_doubles(cw_o, "vote_weights", n, a.cw, NULL, 1)) return NULL;
    if (keep_o == Py_None && rank_o == Py_None && drop_o != Py_None &&
        take_drop(drop_o, n, a.dthr, a.dall))
        return NULL;
    a.keep_rescale = keep_rescale;
    if (take_key(key_o, a.key)) return NULL;
    a.drop = drop_o != Py_None;
    a.offset = offset;
    for (int i = 0; i < n; i++) a.sw[i] = (float)((a.w[i] > 0.0) - (a.w[i] < 0.0));
    a.n = n;
    a.N = N;
    a.on_base = on_base;
    a.trim = t_o != Py_None;
    a.elect = elect;
    a.normalize = normalize;
    a.base_dt = bdt;
    a.models_dt = mdt;
    a.out_dt = odt;
    a.scale = scale;

    if (base_o != Py_None) {
        Py_buffer *bv = take_buffer(&bs, base_o, "base", N, fm_dtype_size(bdt), 0);
        if (!bv) goto fail;
        a.base = bv->buf;
    }
    if (take_models(&bs, models_o, n, N, mdt, a.models)) goto fail;
    if (keep_o != Py_None) {
        Py_buffer *kv = take_buffer(&bs, keep_o, "keep", (int64_t)n * N, sizeof(int64_t), 0);
        if (!kv) goto fail;
        const int64_t *T = kv->buf;
        for (int64_t k = 0; k < (int64_t)n * N; k++)
            if (T[k] < 0 || T[k] > ((int64_t)1 << 32)) {
                PyErr_Format(PyExc_ValueError, "keep[%lld]: must be in [0, 2**32], got %lld",
                             (long long)k, (long long)T[k]);
                goto fail;
            }
        a.keep = T;
    }
    if (rank_o != Py_None) {
        Py_buffer *rv = take_buffer(&bs, rank_o, "rank_keep", (long long)n * rank_len,
                                    sizeof(int64_t), 0);
        if (!rv || check_int(rv, "rank_keep", 8)) goto fail;
        const int64_t *T = rv->buf;
        for (int64_t k = 0; k < (int64_t)n * rank_len; k++)
            if (T[k] < 0 || T[k] > ((int64_t)1 << 32)) {
                PyErr_Format(PyExc_ValueError, "rank_keep[%lld]: must be in [0, 2**32], got %lld",
                             (long long)k, (long long)T[k]);
                goto fail;
            }
        a.rank_keep = T;
        a.rank_M = rank_len;
    }
    Py_buffer *ov = take_buffer(&bs, out_o, "out", N, fm_dtype_size(odt), 1);
    if (!ov) goto fail;
    a.out = ov->buf;
    if (check_out_alias(ov, a.base, bdt, a.models, mdt, n, N)) goto fail;
    Py_buffer *cv = take_int_output(&bs, counts_o, "counts", (long long)n * FM_NCOUNTERS, 8);
    if (!cv) goto fail;
    a.counts = cv->buf;

    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fm_merge(&a);
    Py_END_ALLOW_THREADS
    return kernel_done(&bs, rc);
fail:
    bufset_release(&bs);
    return NULL;
}

PyDoc_STRVAR(philox_doc,
"philox4x32_10(ctr, key) -> (r0, r1, r2, r3)\n--\n\n"
"Philox4x32-10 of ctr (4 uint32) under key (2 uint32): the kernels' own routine, for tests.");

static PyObject *py_philox(PyObject *self, PyObject *args)
{
    unsigned int c[4], k[2];
    (void)self;
    if (!PyArg_ParseTuple(args, "(IIII)(II)", &c[0], &c[1], &c[2], &c[3], &k[0], &k[1]))
        return NULL;
    uint32_t ctr[4] = {c[0], c[1], c[2], c[3]};
    fm_philox4x32_10(ctr, k[0], k[1]);
    return Py_BuildValue("(IIII)", ctr[0], ctr[1], ctr[2], ctr[3]);
}

PyDoc_STRVAR(use_philox_doc,
"use_philox(name=None) -> str\n--\n\n"
"The Philox variant DARE's random words come from: 'avx512', 'avx2' or 'scalar' (the\n"
"best the CPU has, at import). With a name, switch to it first (ValueError when the CPU\n"
"lacks it); for tests, which check that every variant gives the same words. Not safe\n"
"while a merge runs.");

static PyObject *py_use_philox(PyObject *self, PyObject *args)
{
    const char *name = NULL;
    (void)self;
    if (!PyArg_ParseTuple(args, "|z", &name)) return NULL;
    if (name && fm_philox_use(name) != 0) {
        PyErr_Format(PyExc_ValueError, "Philox variant %.20s: unknown, or not supported by "
                     "this CPU / build", name);
        return NULL;
    }
    return PyUnicode_FromString(fm_philox_variant());
}

PyDoc_STRVAR(dare_words_doc,
"dare_words(dst, N, key, offset, model)\n--\n\n"
"dst (writable N uint32/int32 items) = DARE's random words r_model(offset + j)\n"
"(docs/spec.md 8a), made by the merge's own block generator; for tests.");

static PyObject *py_dare_words(PyObject *self, PyObject *args)
{
    PyObject *dst_o, *key_o;
    long long N, offset;
    int model;
    uint32_t key[2];
    bufset bs = {.count = 0};
    (void)self;
    if (!PyArg_ParseTuple(args, "OLOLi", &dst_o, &N, &key_o, &offset, &model)) return NULL;
    if (check_sizes(1, N) || take_key(key_o, key)) return NULL;
    if (offset < 0 || offset > INT64_MAX - N || model < 0) {
        PyErr_SetString(PyExc_ValueError, "offset and model must be >= 0 (offset + N < 2**63)");
        return NULL;
    }
    Py_buffer *dv = take_buffer(&bs, dst_o, "dst", N, 4, 1);
    if (!dv) goto fail;
    Py_BEGIN_ALLOW_THREADS
    fm_dare_words(dv->buf, N, offset, key[0], key[1], (uint32_t)model);
    Py_END_ALLOW_THREADS
    bufset_release(&bs);
    Py_RETURN_NONE;
fail:
    bufset_release(&bs);
    return NULL;
}

PyDoc_STRVAR(convert_doc,
"convert(src, src_dtype, dst, dst_dtype, N)\n--\n\n"
"dst = round_to_nearest_even(f32(src)): the kernels' own conversion routines, for tests.\n"
"src_dtype F64 (fp64 src, N doubles): the merge's output rounding, fp64 rounded once.");

#define FM_F64_SRC 3   /* convert's src_dtype for fp64 (tests only; kernels take no fp64) */

static PyObject *py_convert(PyObject *self, PyObject *args)
{
    PyObject *src_o, *dst_o;
    int sdt, ddt;
    long long N;
    bufset bs = {.count = 0};
    (void)self;
    if (!PyArg_ParseTuple(args, "OiOiL", &src_o, &sdt, &dst_o, &ddt, &N)) return NULL;
    if (check_sizes(1, N) || (sdt != FM_F64_SRC && check_dtype(sdt, "src_dtype")) ||
        check_dtype(ddt, "dst_dtype"))
        return NULL;
    Py_buffer *sv = take_buffer(&bs, src_o, "src", N, sdt == FM_F64_SRC ? 8 : fm_dtype_size(sdt), 0);
    if (!sv) goto fail;
    Py_buffer *dv = take_buffer(&bs, dst_o, "dst", N, fm_dtype_size(ddt), 1);
    if (!dv) goto fail;
    if (overlaps(sv->buf, sv->len, dv->buf, dv->len)) {
        PyErr_SetString(PyExc_ValueError, "dst: overlaps src");
        goto fail;
    }
    Py_BEGIN_ALLOW_THREADS
    if (sdt == FM_F64_SRC) fm_convert_f64(dv->buf, ddt, sv->buf, N);
    else fm_convert(dv->buf, ddt, sv->buf, sdt, N);
    Py_END_ALLOW_THREADS
    bufset_release(&bs);
    Py_RETURN_NONE;
fail:
    bufset_release(&bs);
    return NULL;
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *arg)
{
    (void)self;
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 0 || n > 4096) {
        PyErr_Format(PyExc_ValueError, "set_num_threads: 0 (OpenMP default) .. 4096, got %ld", n);
        return NULL;
    }
    fm_set_num_threads((int)n);
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *unused)
{
    (void)self; (void)unused;
    return PyLong_FromLong(fm_get_num_threads());
}

/* ------------------------------------------------------------------------------------ */
/* SLERP / NuSLERP / model stock (gram.c, docs/spec.md 8c)                                */

/* A C-contiguous fp64 buffer of exactly `count` items. */
static Py_buffer *take_f64(bufset *bs, PyObject *obj, const char *what, long long count,
                           int writable)
{
    Py_buffer *v = take_buffer(bs, obj, what, count, 8, writable);
    if (!v) return NULL;
    const char *f = v->format ? v->format : "B";
    if (*f == '<' || *f == '=' || *f == '@') f++;
    if (!(*f == 'd' && f[1] == '\0')) {
        PyErr_Format(PyExc_ValueError, "%s: an fp64 buffer is needed, got format %.10s", what,
                     v->format ? v->format : "B");
        return NULL;
    }
    return v;
}

/* base (on_base) and models, as the passes over vectors take them */
static int take_vectors(bufset *bs, PyObject *base_o, PyObject *models_o, int n, long long N,
                        int on_base, int bdt, int mdt, const void **base, const void **models)
{
    if (check_sizes(n, N) || check_dtype(mdt, "models_dtype")) return -1;
    if (on_base ? (base_o == Py_None || check_dtype(bdt, "base_dtype") != 0) : base_o != Py_None) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, on_base ? "on_base needs a base buffer"
                                                      : "base must be None when on_base is false");
        return -1;
    }
    *base = NULL;
    if (on_base) {
        Py_buffer *bv = take_buffer(bs, base_o, "base", N, fm_dtype_size(bdt), 0);
        if (!bv) return -1;
        *base = bv->buf;
    }
    return take_models(bs, models_o, n, N, mdt, models);
}

PyDoc_STRVAR(gram_doc,
"gram(base, models, n, N, base_dtype, models_dtype, on_base, seg, out, *, columns=False,\n"
"     threads=0)\n"
"--\n\n"
"Statistics pass of docs/spec.md 8c: the N entries are pieces of seg entries, each cut\n"
"into GRAM_BLOCK blocks from its start; out (writable fp64, gram_blocks(N, seg) * n(n+1)/2\n"
"items, overwritten) gets, per block and pair k <= l, the pairwise-tree sum of v_k*v_l\n"
"(v_k = f32(models[k]) - f32(base) with on_base, else f32(models[k]); base None then).\n"
"columns: the N entries are N / seg rows of seg columns (seg must divide N), each column\n"
"cut into blocks of GRAM_BLOCK rows; out holds [row blocks][seg][n(n+1)/2] items.");

static PyObject *py_gram(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"base", "models", "n", "N", "base_dtype", "models_dtype",
                             "on_base", "seg", "out", "columns", "threads", NULL};
    PyObject *base_o, *models_o, *out_o;
    int n, bdt, mdt, on_base, columns = 0, threads = 0;
    long long N, seg;
    bufset bs = {.count = 0};
    fm_gram_args a;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOiLiipLO|$pi", kwlist, &base_o, &models_o, &n,
                                     &N, &bdt, &mdt, &on_base, &seg, &out_o, &columns, &threads))
        return NULL;
    memset(&a, 0, sizeof a);
    if (seg < 1) {
        PyErr_Format(PyExc_ValueError, "seg must be >= 1, got %lld", seg);
        return NULL;
    }
    if (columns && N % seg != 0) {
        PyErr_Format(PyExc_ValueError, "columns: seg (%lld) must divide N (%lld)", seg, N);
        return NULL;
    }
    if ((a.threads = resolve_threads(threads)) < 0) return NULL;
    if (take_vectors(&bs, base_o, models_o, n, N, on_base, bdt, mdt, &a.base, a.models))
        goto fail;
    Py_buffer *ov = take_f64(&bs, out_o, "out", fm_gram_items(N, seg, columns, n), 1);
    if (!ov) goto fail;
    for (int k = 0; k < bs.count - 1; k++)
        if (overlaps(ov->buf, (size_t)ov->len, bs.views[k].buf, (size_t)bs.views[k].len)) {
            PyErr_SetString(PyExc_ValueError, "out: overlaps an input");
            goto fail;
        }
    a.n = n;
    a.N = N;
    a.on_base = on_base;
    a.base_dt = bdt;
    a.models_dt = mdt;
    a.seg = seg;
    a.columns = columns;
    a.out = ov->buf;

    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fm_gram(&a);
    Py_END_ALLOW_THREADS
    return kernel_done(&bs, rc);
fail:
    bufset_release(&bs);
    return NULL;
}

PyDoc_STRVAR(combine_doc,
"combine(base, models, out, n, N, base_dtype, models_dtype, out_dtype, on_base, columns,\n"
"        coef, nseg, seg, nonfinite, *, threads=0)\n"
"--\n\n"
"Combine pass of docs/spec.md 8c: out[j] = [f32(base[j]) +] sum_k coef[s][k] * v_k[j]\n"
"in fp64 (k in order, from +0.0), rounded once to out_dtype, where s = j // seg (or\n"
"j % seg with columns); coef: fp64 nseg*n finite values covering every s; nonfinite:\n"
"writable int64 [n], the non-finite entries of each v_k. out may be base or a model\n"
"buffer itself (same dtype) but must not partially overlap any input.");

static PyObject *py_combine(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"base", "models", "out", "n", "N", "base_dtype", "models_dtype",
                             "out_dtype", "on_base", "columns", "coef", "nseg", "seg",
                             "nonfinite", "threads", NULL};
    PyObject *base_o, *models_o, *out_o, *coef_o, *nf_o;
    int n, bdt, mdt, odt, on_base, columns, threads = 0;
    long long N, nseg, seg;
    bufset bs = {.count = 0};
    fm_combine_args a;
    (void)self;

    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOiLiiippOLLO|$i", kwlist, &base_o, &models_o,
                                     &out_o, &n, &N, &bdt, &mdt, &odt, &on_base, &columns,
                                     &coef_o, &nseg, &seg, &nf_o, &threads))
        return NULL;
    memset(&a, 0, sizeof a);
    if (check_dtype(odt, "out_dtype")) return NULL;
    if (seg < 1) {
        PyErr_Format(PyExc_ValueError, "seg must be >= 1, got %lld", seg);
        return NULL;
    }
    const long long need = N == 0 ? 0 : columns ? (N < seg ? N : seg) : (N + seg - 1) / seg;
    if (nseg < need || nseg > (long long)(PY_SSIZE_T_MAX / 8 / (n > 0 ? n : 1))) {
        PyErr_Format(PyExc_ValueError, "nseg: %lld segments of coefficients for a chunk that "
                     "touches %lld", nseg, need);
        return NULL;
    }
    if ((a.threads = resolve_threads(threads)) < 0) return NULL;
    if (take_vectors(&bs, base_o, models_o, n, N, on_base, bdt, mdt, &a.base, a.models))
        goto fail;
    Py_buffer *cv = take_f64(&bs, coef_o, "coef", nseg * n, 0);
    if (!cv) goto fail;
    const double *coef = cv->buf;
    for (long long k = 0; k < nseg * n; k++)
        if (!(fabs(coef[k]) <= DBL_MAX)) {
            bad_number("coef", (int)(k < INT32_MAX ? k : -1), coef[k], "must be finite");
            goto fail;
        }
    Py_buffer *ov = take_buffer(&bs, out_o, "out", N, fm_dtype_size(odt), 1);
    if (!ov) goto fail;
    if (check_out_alias(ov, a.base, bdt, a.models, mdt, n, N)) goto fail;
    if (overlaps(ov->buf, (size_t)ov->len, cv->buf, (size_t)cv->len)) {
        PyErr_SetString(PyExc_ValueError, "out: overlaps coef");
        goto fail;
    }
    Py_buffer *nv = take_int_output(&bs, nf_o, "nonfinite", n, 8);
    if (!nv) goto fail;
    a.n = n;
    a.N = N;
    a.on_base = on_base;
    a.columns = columns;
    a.base_dt = bdt;
    a.models_dt = mdt;
    a.out_dt = odt;
    a.out = ov->buf;
    a.coef = coef;
    a.seg = seg;
    a.nonfinite = nv->buf;

    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fm_combine(&a);
    Py_END_ALLOW_THREADS
    return kernel_done(&bs, rc);
fail:
    bufset_release(&bs);
    return NULL;
}

static PyMethodDef methods[] = {
    {"histogram", (PyCFunction)(void (*)(void))py_histogram, METH_VARARGS | METH_KEYWORDS,
     histogram_doc},
    {"merge", (PyCFunction)(void (*)(void))py_merge, METH_VARARGS | METH_KEYWORDS, merge_doc},
    {"bracket", (PyCFunction)(void (*)(void))py_bracket, METH_VARARGS | METH_KEYWORDS,
     bracket_doc},
    {"convert", py_convert, METH_VARARGS, convert_doc},
    {"philox4x32_10", py_philox, METH_VARARGS, philox_doc},
    {"dare_words", py_dare_words, METH_VARARGS, dare_words_doc},
    {"use_philox", py_use_philox, METH_VARARGS, use_philox_doc},
    {"gram", (PyCFunction)(void (*)(void))py_gram, METH_VARARGS | METH_KEYWORDS, gram_doc},
    {"combine", (PyCFunction)(void (*)(void))py_combine, METH_VARARGS | METH_KEYWORDS,
     combine_doc},
    {"set_num_threads", py_set_num_threads, METH_O,
     "set_num_threads(n): threads for later calls; 0 restores OpenMP's default."},
    {"get_num_threads", py_get_num_threads, METH_NOARGS,
     "get_num_threads() -> threads a call with threads=0 uses (1 without OpenMP)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "fastmerge._cmerge",
    "fastmerge C CPU kernels (bracket and radix-select passes, fused TIES/TIES-SV/DARE "
    "merge); see "
    "kernels/c/kernels.c.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__cmerge(void)
{
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    fm_philox_init();
    PyObject *bits = Py_BuildValue("(iii)", FM_DIGIT_BITS[0], FM_DIGIT_BITS[1], FM_DIGIT_BITS[2]);
    PyObject *shift = Py_BuildValue("(iii)", FM_SHIFT[0], FM_SHIFT[1], FM_SHIFT[2]);
    const int bad = !bits || !shift || PyModule_AddIntConstant(m, "F32", FM_F32) ||
        PyModule_AddIntConstant(m, "F16", FM_F16) || PyModule_AddIntConstant(m, "BF16", FM_BF16) ||
        PyModule_AddIntConstant(m, "NBINS", FM_NBINS) ||
        PyModule_AddIntConstant(m, "F64", FM_F64_SRC) ||
        PyModule_AddIntConstant(m, "ELECT_NONE", FM_ELECT_NONE) ||
        PyModule_AddIntConstant(m, "ELECT_SUM", FM_ELECT_SUM) ||
        PyModule_AddIntConstant(m, "ELECT_COUNT", FM_ELECT_COUNT) ||
        PyModule_AddIntConstant(m, "N_COUNTERS", FM_NCOUNTERS) ||
        PyModule_AddIntConstant(m, "MAX_MODELS", FM_MAX_MODELS) ||
        PyModule_AddIntConstant(m, "GRAM_BLOCK", FM_GRAM_BLOCK) ||
        PyModule_AddIntConstant(m, "OPENMP", fm_have_openmp()) ||
        PyModule_AddStringConstant(m, "ISA_CLONES", fm_isa_clones()) ||
        PyModule_AddObjectRef(m, "DIGIT_BITS", bits) || PyModule_AddObjectRef(m, "SHIFT", shift);
    Py_XDECREF(bits);
    Py_XDECREF(shift);
    if (bad) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
