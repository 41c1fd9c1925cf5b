/* Region decoding of a JPEG with libjpeg(-turbo) 62: only the window a crop needs, at an M/8 scale.
 *
 * decode(data, out, colorspace, scale, x, y, w, h) -> (x_start, width, image_width, image_height)
 *
 *   data        the JPEG's bytes (any contiguous buffer)
 *   out         a writable contiguous buffer; it receives h rows of `width` pixels (no padding)
 *   colorspace  0 gray (1 byte a pixel), 1 RGB, 2 BGR (3 bytes)
 *   scale       M of the M/8 scale (1..8)
 *   x, y, w, h  the window, in pixels of the image decoded at M/8
 *
 * Decodes rows y .. y+h-1 of the scaled image, the columns [x_start, x_start + width) that
 * jpeg_crop_scanline widens [x, x+w) to (x_start: x rounded down to an iMCU column; x_start + width
 * == x + w): the window starts at column x - x_start of the buffer. libjpeg upsamples the chroma
 * of the outer columns as at the image's edges: they may differ from a whole decode's (by a few
 * levels), except where they are the image's edges; ask for one column more on each side. Images
 * whose cropping libjpeg-turbo < 3.0 gets wrong (4x2 and 2x4 subsampling, `crop_is_exact`) are
 * decoded at the full width (x_start 0, width the scaled image's). Multi-scan (progressive,
 * non-interleaved) JPEGs are refused. Rows above the window are skipped (jpeg_skip_scanlines: entropy-decoded,
 * no inverse DCT, no colour conversion); decoding stops after the window's last row
 * (jpeg_abort_decompress). Errors and warnings of libjpeg (corrupt or truncated data inside what
 * was decoded, an unsupported file) raise ValueError with libjpeg's message, as simplejpeg's strict
 * mode does; the caller falls back to another decoder. The GIL is released while decoding.
 *
 * loaded_library() -> str | None
 *
 *   The file name of the shared libjpeg that this process actually runs (dladdr() of
 *   jpeg_CreateDecompress: the library the dynamic linker bound it to, which may be another build
 *   than the headers' one, below), as the dynamic linker found it (maybe a symbolic link); None where
 *   dladdr() names no shared library apart from this module (libjpeg linked in statically) or fails.
 *   The module's constants are the headers' versions, at build time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h> /* first: it defines _GNU_SOURCE, which Dl_info and dladdr() need */

#include <dlfcn.h>
#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

#ifndef LIBJPEG_TURBO_VERSION_NUMBER /* jpeg_crop_scanline and jpeg_skip_scanlines are libjpeg-turbo's (>= 1.5) */
#define LIBJPEG_TURBO_VERSION_NUMBER 0
#endif

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} error_mgr;

static void on_error(j_common_ptr cinfo) {
    error_mgr *err = (error_mgr *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

/* Warnings (level < 0: corrupt data, a premature end) are errors; trace messages are ignored. */
static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) on_error(cinfo);
}

#if JPEG_LIB_VERSION >= 70
#define MIN_DCT_SCALED_SIZE(cinfo) ((cinfo)->min_DCT_h_scaled_size)
#define DCT_SCALED_SIZE(comp) ((comp)->DCT_h_scaled_size)
#else
#define MIN_DCT_SCALED_SIZE(cinfo) ((cinfo)->min_DCT_scaled_size)
#define DCT_SCALED_SIZE(comp) ((comp)->DCT_scaled_size)
#endif

/* Whether jpeg_crop_scanline() crops this image exactly (after jpeg_start_decompress). Before
 * libjpeg-turbo 3.0 (Debian 12 ships 2.1.5) it computes a component's cropped width without the
 * IDCT scaling that implements part of its upsampling (4x2 and 2x4 subsampling at any scale below
 * 8/8: the chroma is decoded at twice the size and upsampled 2x1 or 1x2): half of each cropped chroma
 * row is never upsampled, and the colour converter reads uninitialised heap memory into the output
 * (upstream issue #669, fixed by commit 3a53627). Those images are decoded at the full width (no
 * column cropping): a component is safe where its IDCT is not scaled apart from the smallest one
 * (the old formula is then the right one), or where it needs no upsampling at all. */
static int crop_is_exact(j_decompress_ptr cinfo) {
    int min_size = MIN_DCT_SCALED_SIZE(cinfo);
    for (int ci = 0; ci < cinfo->num_components; ci++) {
        jpeg_component_info *comp = &cinfo->comp_info[ci];
        int size = DCT_SCALED_SIZE(comp);
        if (size == min_size) continue;
        if (comp->h_samp_factor * size == cinfo->max_h_samp_factor * min_size
            && comp->v_samp_factor * size == cinfo->max_v_samp_factor * min_size)
            continue; /* full size after its IDCT: not upsampled */
        return 0;
    }
    return 1;
}

typedef struct {
    const unsigned char *data;
    unsigned long size;
    unsigned char *out;
    Py_ssize_t out_size;
    int colorspace, scale, x, y, w, h;
    /* results */
    unsigned int x_start, width, image_width, image_height;
    char message[JMSG_LENGTH_MAX + 64];
} job;

static int run(job *j) {
    struct jpeg_decompress_struct cinfo;
    error_mgr err;
    int channels = j->colorspace == 0 ? 1 : 3;
    memset(&cinfo, 0, sizeof(cinfo));
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    if (setjmp(err.jump)) {
        snprintf(j->message, sizeof(j->message), "libjpeg: %s", err.message);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, j->data, j->size);
    if (jpeg_read_header(&cinfo, TRUE) != JPEG_HEADER_OK) {
        snprintf(j->message, sizeof(j->message), "no image in the JPEG data");
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    if (cinfo.jpeg_color_space != JCS_GRAYSCALE && cinfo.jpeg_color_space != JCS_YCbCr
        && cinfo.jpeg_color_space != JCS_RGB) {
        snprintf(j->message, sizeof(j->message), "unsupported JPEG colour space %d", (int)cinfo.jpeg_color_space);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    /* One sequential scan holding every component, as Decoder routes here: in a progressive file the
     * block smoothing of the coarse scans reads neighbouring blocks, so a window would not be bitwise
     * the same pixels as a whole decode (it is not decoded here: simplejpeg decodes it whole). */
    if (jpeg_has_multiple_scans(&cinfo)) {
        snprintf(j->message, sizeof(j->message), "a multi-scan (progressive or non-interleaved) JPEG");
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    cinfo.scale_num = (unsigned int)j->scale;
    cinfo.scale_denom = 8;
    cinfo.out_color_space = j->colorspace == 0 ? JCS_GRAYSCALE : j->colorspace == 1 ? JCS_EXT_RGB : JCS_EXT_BGR;
    cinfo.dct_method = JDCT_ISLOW;
    cinfo.do_fancy_upsampling = TRUE;
    jpeg_start_decompress(&cinfo);
    j->image_width = cinfo.output_width;
    j->image_height = cinfo.output_height;
    if ((unsigned int)j->x + (unsigned int)j->w > cinfo.output_width
        || (unsigned int)j->y + (unsigned int)j->h > cinfo.output_height) {
        snprintf(j->message, sizeof(j->message), "window %dx%d+%d+%d outside the %ux%u image", j->w, j->h, j->x,
                 j->y, cinfo.output_width, cinfo.output_height);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    JDIMENSION x_start = (JDIMENSION)j->x, width = (JDIMENSION)j->w;
    if (width < cinfo.output_width && crop_is_exact(&cinfo)) jpeg_crop_scanline(&cinfo, &x_start, &width);
    else x_start = 0, width = cinfo.output_width;
    j->x_start = x_start;
    j->width = width;
    if ((Py_ssize_t)width * channels * j->h > j->out_size) {
        snprintf(j->message, sizeof(j->message), "output buffer of %zd bytes too small for %ux%d pixels",
                 j->out_size, width, j->h);
        jpeg_destroy_decompress(&cinfo);
        return -2;
    }
    if (j->y > 0 && jpeg_skip_scanlines(&cinfo, (JDIMENSION)j->y) != (JDIMENSION)j->y) {
        snprintf(j->message, sizeof(j->message), "could not skip %d rows", j->y);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    JDIMENSION end = (JDIMENSION)(j->y + j->h);
    size_t stride = (size_t)width * channels;
    while (cinfo.output_scanline < end) {
        JSAMPROW row = j->out + (size_t)(cinfo.output_scanline - (JDIMENSION)j->y) * stride;
        if (jpeg_read_scanlines(&cinfo, &row, 1) != 1) {
            snprintf(j->message, sizeof(j->message), "no scanline %u", cinfo.output_scanline);
            jpeg_destroy_decompress(&cinfo);
            return -1;
        }
    }
    if (cinfo.output_scanline < cinfo.output_height) jpeg_abort_decompress(&cinfo);
    else jpeg_finish_decompress(&cinfo);
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer data, out;
    job j;
    (void)self;
    memset(&j, 0, sizeof(j));
    if (!PyArg_ParseTuple(args, "y*w*iiiiii", &data, &out, &j.colorspace, &j.scale, &j.x, &j.y, &j.w, &j.h))
        return NULL;
    if (j.colorspace < 0 || j.colorspace > 2 || j.scale < 1 || j.scale > 8 || j.x < 0 || j.y < 0 || j.w < 1
        || j.h < 1) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&out);
        PyErr_SetString(PyExc_ValueError, "colorspace 0..2, scale 1..8, x, y >= 0 and w, h >= 1");
        return NULL;
    }
    j.data = (const unsigned char *)data.buf;
    j.size = (unsigned long)data.len;
    j.out = (unsigned char *)out.buf;
    j.out_size = out.len;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run(&j);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    if (rc != 0) {
        PyErr_SetString(PyExc_ValueError, j.message);
        return NULL;
    }
    return Py_BuildValue("IIII", j.x_start, j.width, j.image_width, j.image_height);
}

static PyObject *loaded_library(PyObject *self, PyObject *unused) {
    Dl_info lib, own;
    (void)self;
    (void)unused;
    if (dladdr((void *)&jpeg_CreateDecompress, &lib) == 0 || lib.dli_fname == NULL || lib.dli_fname[0] == '\0')
        Py_RETURN_NONE;
    /* The same object as this function's: libjpeg was linked into this module, not loaded. */
    if (dladdr((void *)&loaded_library, &own) != 0 && own.dli_fbase == lib.dli_fbase) Py_RETURN_NONE;
    return PyUnicode_DecodeFSDefault(lib.dli_fname);
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS,
     "decode(data, out, colorspace, scale, x, y, w, h) -> (x_start, width, image_width, image_height)\n\n"
     "Decode rows y..y+h-1 of a JPEG scaled by scale/8, columns [x_start, x_start+width) (the window\n"
     "[x, x+w) widened on the left to an iMCU column, or the whole width), into `out` (h rows of width pixels, 1 or 3 bytes each:\n"
     "colorspace 0 gray, 1 RGB, 2 BGR). ValueError on any libjpeg error or warning."},
    {"loaded_library", loaded_library, METH_NOARGS,
     "loaded_library() -> str | None\n\n"
     "The file name of the shared libjpeg this process runs (dladdr of jpeg_CreateDecompress), or None\n"
     "where no shared library apart from this module provides it (linked statically) or dladdr fails."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_jpegregion", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__jpegregion(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddIntConstant(m, "VERSION", 2) < 0
        || PyModule_AddIntConstant(m, "JPEG_LIB_VERSION", JPEG_LIB_VERSION) < 0
        || PyModule_AddIntConstant(m, "LIBJPEG_TURBO_VERSION_NUMBER", LIBJPEG_TURBO_VERSION_NUMBER) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
