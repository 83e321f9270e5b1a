/*
 * Cropped, DCT-scaled JPEG decode followed by a bilinear antialiased resize, in one call per image.
 *
 * Why: the ImageNet training transform (qkd_jax/data/jpeg_augment.py) needs only the random crop of
 * each image. libjpeg(-turbo) can skip the work outside it: `jpeg_crop_scanline` restricts the IDCT,
 * upsampling and colour conversion to a column range and `jpeg_skip_scanlines` skips the rows above
 * it (their entropy data is still read). The resize then reads the decoded region directly.
 *
 * The resize reproduces Pillow's `Image.resize(size, BILINEAR, box=...)` on an RGB image exactly:
 * the triangle filter widened by the downscale factor, the box as single-precision floats, weights
 * normalised to sum 1 and stored with 22 fractional bits, two passes each rounded to uint8 (the
 * vertical one first when the height shrinks by more than twice what the width does, as Pillow 13
 * orders them, else the horizontal one over the rows the vertical pass reads); an integral box of
 * the output's size is a plain crop. Tests compare it with Pillow bit for bit (tests/data/test_jpeg_crop.py).
 *
 * The decoded region keeps MARGIN pixels beyond what the filter reads on the left, right and top,
 * so the chroma upsampling at the region's edges sees the same neighbours as in a full decode and
 * the pixels the filter reads equal the full decode's.
 *
 * Errors (and libjpeg's corrupt-data warnings) raise ValueError; the caller falls back to the
 * full-decode path. Arguments are checked before any arithmetic on them (finite box inside the
 * image, sizes >= 1), a file must end with the end-of-image marker (a truncated file is left to the
 * full decode, which refuses it), and libjpeg's skip and read calls must make the progress the
 * buffer arithmetic assumes, so no input reads or writes out of bounds or loops forever.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <setjmp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>

#define WEIGHT_BITS 22 /* 32 bits - 8 for the pixel - 2 of headroom */
#define MARGIN 16      /* decoded pixels beyond the filter's reach (>= one iMCU at any scale) */
#define PAD 4          /* spare bytes after every source buffer (the AVX2 gather reads one past a pixel) */

/* ---------------------------------------------------------------- resampling */

typedef struct {
    int taps;        /* weights stored per output sample */
    int *first;      /* per output sample: first input index read */
    int *count;      /* per output sample: number of inputs read */
    int32_t *weight; /* per output sample: `taps` fixed-point weights */
} Kernel;

static void kernel_free(Kernel *k) {
    free(k->first);
    free(k->count);
    free(k->weight);
    k->first = k->count = NULL;
    k->weight = NULL;
}

static double triangle(double x) {
    x = fabs(x);
    return x < 1.0 ? 1.0 - x : 0.0;
}

/* Weights mapping `in_size` samples, of which [lo, hi) is kept, onto `out_size` samples. */
static int kernel_build(Kernel *k, int in_size, float lo, float hi, int out_size) {
    double scale = (double)(hi - lo) / out_size;
    double widen = scale < 1.0 ? 1.0 : scale;
    double reach = 1.0 * widen; /* the triangle's support is 1 input sample, widened when shrinking */
    double inv_widen = 1.0 / widen;
    double *w;
    int o, i;

    k->taps = (int)ceil(reach) * 2 + 1;
    k->first = malloc(sizeof(int) * (size_t)out_size);
    k->count = malloc(sizeof(int) * (size_t)out_size);
    k->weight = malloc(sizeof(int32_t) * (size_t)out_size * (size_t)k->taps);
    w = malloc(sizeof(double) * (size_t)k->taps);
    if (!k->first || !k->count || !k->weight || !w) {
        free(w);
        kernel_free(k);
        return -1;
    }
    for (o = 0; o < out_size; o++) {
        double center = lo + (o + 0.5) * scale;
        double total = 0.0;
        int start = (int)(center - reach + 0.5);
        int stop = (int)(center + reach + 0.5);
        int n;
        int32_t *out = k->weight + (size_t)o * (size_t)k->taps;
        if (start < 0) start = 0;
        if (stop > in_size) stop = in_size;
        n = stop - start;
        for (i = 0; i < n; i++) {
            w[i] = triangle((i + start - center + 0.5) * inv_widen);
            total += w[i];
        }
        for (i = 0; i < k->taps; i++) {
            double v = i < n ? (total != 0.0 ? w[i] / total : w[i]) : 0.0;
            out[i] = v < 0 ? (int32_t)(-0.5 + v * (1 << WEIGHT_BITS)) : (int32_t)(0.5 + v * (1 << WEIGHT_BITS));
        }
        k->first[o] = start;
        k->count[o] = n < 0 ? 0 : n;
    }
    free(w);
    return 0;
}

static inline uint8_t to_u8(int32_t acc) {
    int32_t v = acc >> WEIGHT_BITS;
    return v < 0 ? 0 : (v > 255 ? 255 : (uint8_t)v);
}

/* An RGB image: pixel (y, x) channel c at data[(y - y0) * stride + (x - x0) * 3 + c]. */
typedef struct {
    const uint8_t *data;
    ptrdiff_t stride;
    int y0, x0;
} View;

static inline const uint8_t *view_at(const View *v, int y, int x) {
    return v->data + (ptrdiff_t)(y - v->y0) * v->stride + (ptrdiff_t)(x - v->x0) * 3;
}

__attribute__((target_clones("avx2", "default")))
static int pass_y(const View *src, int shift, int col_lo, int width, const Kernel *k, int out_h, uint8_t *dst) {
    int o, j, i, n = width * 3;
    int32_t *acc = malloc(sizeof(int32_t) * (size_t)n);
    if (!acc) return -1;
    for (o = 0; o < out_h; o++) {
        const int32_t *w = k->weight + (size_t)o * (size_t)k->taps;
        uint8_t *row = dst + (size_t)o * (size_t)n;
        for (j = 0; j < n; j++) acc[j] = 1 << (WEIGHT_BITS - 1);
        for (i = 0; i < k->count[o]; i++) {
            const uint8_t *p = view_at(src, k->first[o] - shift + i, col_lo);
            int32_t wi = w[i];
            for (j = 0; j < n; j++) acc[j] += p[j] * wi;
        }
        for (j = 0; j < n; j++) row[j] = to_u8(acc[j]);
    }
    free(acc);
    return 0;
}

/* What a resize of a (full_h, full_w) image to (out_h, out_w) over `box` reads and how. */
typedef struct {
    int crop;             /* integral box of the output's size: a plain copy */
    int horizontal, vertical;
    int vertical_first;   /* Pillow's order: vertical first when the height shrinks > 2x more than the width */
    Kernel kx, ky;
    int row_lo, row_hi;   /* source rows read */
    int col_lo, col_hi;   /* source columns read */
} Plan;

static void plan_free(Plan *p) {
    kernel_free(&p->kx);
    kernel_free(&p->ky);
}

static int plan_build(Plan *p, int full_h, int full_w, const float box[4], int out_h, int out_w) {
    memset(p, 0, sizeof(*p));
    if (box[0] - (int)box[0] == 0 && box[2] - box[0] == out_w && box[1] - (int)box[1] == 0 &&
        box[3] - box[1] == out_h) {
        p->crop = 1;
        p->row_lo = (int)box[1];
        p->row_hi = p->row_lo + out_h;
        p->col_lo = (int)box[0];
        p->col_hi = p->col_lo + out_w;
        return 0;
    }
    p->horizontal = out_w != full_w || box[0] != 0 || box[2] != out_w;
    p->vertical = out_h != full_h || box[1] != 0 || box[3] != out_h;
    p->vertical_first = (full_h - out_h) > 0 && (full_h - out_h) > (full_w - out_w) * 2;
    if (kernel_build(&p->ky, full_h, box[1], box[3], out_h)) return -1;
    p->row_lo = p->ky.first[0];
    p->row_hi = p->ky.first[out_h - 1] + p->ky.count[out_h - 1];
    p->col_lo = 0;
    p->col_hi = full_w;
    if (p->horizontal) {
        if (kernel_build(&p->kx, full_w, box[0], box[2], out_w)) {
            plan_free(p);
            return -1;
        }
        p->col_lo = p->kx.first[0];
        p->col_hi = p->kx.first[out_w - 1] + p->kx.count[out_w - 1];
    }
    return 0;
}

/* Outputs [o_lo, out_w) of rows [row_lo, row_hi) of `src`, resampled along x with `k`, into dst
 * (out_w wide, contiguous). Two rows per step share each output's weights. */
static void pass_x_scalar(const View *src, int row_lo, int row_hi, const Kernel *k, int o_lo, int out_w,
                          uint8_t *dst) {
    const int taps = k->taps;
    const int *restrict first = k->first;
    const int *restrict count = k->count;
    const int32_t *restrict weight = k->weight;
    const size_t out_row = (size_t)out_w * 3;
    int y, o, i;
    for (y = row_lo; y < row_hi; y += 2) {
        const int pair = y + 1 < row_hi;
        const uint8_t *restrict a = view_at(src, y, src->x0);
        const uint8_t *restrict b = pair ? view_at(src, y + 1, src->x0) : a;
        uint8_t *ra = dst + (size_t)(y - row_lo) * out_row; /* rb == ra on an odd last row: not restrict */
        uint8_t *rb = pair ? ra + out_row : ra;
        for (o = o_lo; o < out_w; o++) {
            const int32_t *restrict w = weight + (size_t)o * (size_t)taps;
            const ptrdiff_t at = (ptrdiff_t)(first[o] - src->x0) * 3;
            const uint8_t *restrict p = a + at, *restrict q = b + at;
            const int n = count[o];
            int32_t r0 = 1 << (WEIGHT_BITS - 1), g0 = r0, b0 = r0, r1 = r0, g1 = r0, b1 = r0;
            for (i = 0; i < n; i++) {
                const int32_t wi = w[i];
                r0 += p[3 * i] * wi;
                g0 += p[3 * i + 1] * wi;
                b0 += p[3 * i + 2] * wi;
                r1 += q[3 * i] * wi;
                g1 += q[3 * i + 1] * wi;
                b1 += q[3 * i + 2] * wi;
            }
            rb[3 * o] = to_u8(r1);
            rb[3 * o + 1] = to_u8(g1);
            rb[3 * o + 2] = to_u8(b1);
            ra[3 * o] = to_u8(r0);
            ra[3 * o + 1] = to_u8(g0);
            ra[3 * o + 2] = to_u8(b0);
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* The same sums, 8 outputs at a time: one gather of 4 bytes per output and tap brings its R, G, B
 * (integer products and sums in any order give the same result). Reads one byte past a tap's pixel,
 * so every source buffer has PAD spare bytes; stores 4 bytes past each block (12 bytes per 4
 * pixels, 16 stored), so blocks stop at least 2 outputs before the row's end and the rest goes
 * through the scalar loop. */
__attribute__((target("avx2"))) static void pass_x_avx2(const View *src, int row_lo, int row_hi, const Kernel *k,
                                                        int out_w, uint8_t *dst, int32_t *scratch) {
    const int blocks = (out_w - 2) / 8, n = blocks * 8; /* the last block's spare 4 bytes stay in the row */
    int32_t *offs = scratch, *wts = scratch + (size_t)k->taps * (size_t)n, *most = wts + (size_t)k->taps * (size_t)n;
    const __m256i half = _mm256_set1_epi32(1 << (WEIGHT_BITS - 1)), byte = _mm256_set1_epi32(0xFF);
    const __m256i zero = _mm256_setzero_si256(), top = _mm256_set1_epi32(255);
    const __m256i pack = _mm256_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1, 0, 1, 2, 4, 5, 6, 8, 9,
                                          10, 12, 13, 14, -1, -1, -1, -1);
    int y, b, o, i;
    /* Per tap, the outputs' byte offsets (a tap past an output's count repeats its last pixel, with
     * weight 0) and weights, laid out [tap][output]; per block, the most taps any output uses. */
    for (b = 0; b < blocks; b++) most[b] = 0;
    for (o = 0; o < n; o++) {
        int c = k->count[o] > 0 ? k->count[o] : 1;
        if (k->count[o] > most[o / 8]) most[o / 8] = k->count[o];
        for (i = 0; i < k->taps; i++) {
            offs[(size_t)i * n + o] = (k->first[o] + (i < c ? i : c - 1) - src->x0) * 3;
            wts[(size_t)i * n + o] = i < k->count[o] ? k->weight[(size_t)o * (size_t)k->taps + i] : 0;
        }
    }
    for (y = row_lo; y < row_hi; y++) {
        const int *line = (const int *)view_at(src, y, src->x0);
        uint8_t *row = dst + (size_t)(y - row_lo) * (size_t)out_w * 3;
        for (b = 0; b < blocks; b++) {
            __m256i r = half, g = half, bl = half, px;
            o = b * 8;
            for (i = 0; i < most[b]; i++) {
                const __m256i off = _mm256_loadu_si256((const __m256i *)(offs + (size_t)i * n + o));
                const __m256i w = _mm256_loadu_si256((const __m256i *)(wts + (size_t)i * n + o));
                const __m256i v = _mm256_i32gather_epi32(line, off, 1);
                r = _mm256_add_epi32(r, _mm256_mullo_epi32(_mm256_and_si256(v, byte), w));
                g = _mm256_add_epi32(g, _mm256_mullo_epi32(_mm256_and_si256(_mm256_srli_epi32(v, 8), byte), w));
                bl = _mm256_add_epi32(bl, _mm256_mullo_epi32(_mm256_and_si256(_mm256_srli_epi32(v, 16), byte), w));
            }
            r = _mm256_min_epi32(_mm256_max_epi32(_mm256_srai_epi32(r, WEIGHT_BITS), zero), top);
            g = _mm256_min_epi32(_mm256_max_epi32(_mm256_srai_epi32(g, WEIGHT_BITS), zero), top);
            bl = _mm256_min_epi32(_mm256_max_epi32(_mm256_srai_epi32(bl, WEIGHT_BITS), zero), top);
            px = _mm256_or_si256(r, _mm256_or_si256(_mm256_slli_epi32(g, 8), _mm256_slli_epi32(bl, 16)));
            px = _mm256_shuffle_epi8(px, pack); /* each lane: 4 pixels as 12 bytes, then 4 spare */
            _mm_storeu_si128((__m128i *)(row + 3 * o), _mm256_castsi256_si128(px));
            _mm_storeu_si128((__m128i *)(row + 3 * o + 12), _mm256_extracti128_si256(px, 1));
        }
    }
    pass_x_scalar(src, row_lo, row_hi, k, n, out_w, dst);
}
#endif

static int allow_avx2 = 1; /* tests turn it off to check the scalar loop on AVX2 machines */

/* Rows [row_lo, row_hi) of `src`, resampled along x with `k`, into dst (out_w wide, contiguous).
 * `src` must have PAD readable bytes after its last pixel. */
static int pass_x(const View *src, int row_lo, int row_hi, const Kernel *k, int out_w, uint8_t *dst) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (allow_avx2 && out_w > 9 && __builtin_cpu_supports("avx2")) {
        size_t n = (size_t)((out_w - 2) / 8) * 8;
        int32_t *scratch = malloc(sizeof(int32_t) * (2 * (size_t)k->taps * n + n / 8));
        if (!scratch) return -1;
        pass_x_avx2(src, row_lo, row_hi, k, out_w, dst, scratch);
        free(scratch);
        return 0;
    }
#endif
    pass_x_scalar(src, row_lo, row_hi, k, 0, out_w, dst);
    return 0;
}

/* Runs a plan on `src` (which holds at least the rows and columns the plan reads) into dst. */
static int plan_run(const Plan *p, const View *src, int out_h, int out_w, uint8_t *dst) {
    int y, status;
    View t;
    uint8_t *tmp;
    if (p->crop) {
        for (y = 0; y < out_h; y++)
            memcpy(dst + (size_t)y * (size_t)out_w * 3, view_at(src, p->row_lo + y, p->col_lo), (size_t)out_w * 3);
        return 0;
    }
    if (!p->horizontal) /* vertical only (an integral, full-width box is the crop above) */
        return pass_y(src, 0, p->col_lo, p->col_hi - p->col_lo, &p->ky, out_h, dst);
    if (!p->vertical) return pass_x(src, p->row_lo, p->row_hi, &p->kx, out_w, dst);
    t.y0 = 0;
    if (p->vertical_first) { /* rows first over the columns the horizontal pass reads, then columns */
        int cols = p->col_hi - p->col_lo;
        tmp = malloc((size_t)out_h * (size_t)cols * 3 + PAD);
        if (!tmp) return -1;
        status = pass_y(src, 0, p->col_lo, cols, &p->ky, out_h, tmp);
        t.data = tmp;
        t.stride = (ptrdiff_t)cols * 3;
        t.x0 = p->col_lo;
        if (!status) status = pass_x(&t, 0, out_h, &p->kx, out_w, dst);
    } else { /* columns first over the rows the vertical pass reads, then rows */
        int rows = p->row_hi - p->row_lo;
        tmp = malloc((size_t)rows * (size_t)out_w * 3);
        if (!tmp) return -1;
        status = pass_x(src, p->row_lo, p->row_hi, &p->kx, out_w, tmp);
        t.data = tmp;
        t.stride = (ptrdiff_t)out_w * 3;
        t.x0 = 0;
        if (!status) status = pass_y(&t, p->row_lo, 0, out_w, &p->ky, out_h, dst);
    }
    free(tmp);
    return status;
}

/* Mirrors each row of an (h, w, 3) image left-right in place. */
static void mirror_rows(uint8_t *image, int h, int w) {
    int y, x, c;
    for (y = 0; y < h; y++) {
        uint8_t *row = image + (size_t)y * (size_t)w * 3;
        for (x = 0; x < w / 2; x++) {
            uint8_t *a = row + 3 * x, *b = row + 3 * (w - 1 - x);
            for (c = 0; c < 3; c++) {
                uint8_t t = a[c];
                a[c] = b[c];
                b[c] = t;
            }
        }
    }
}

/* ---------------------------------------------------------------- decoding */

typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf escape;
    char message[JMSG_LENGTH_MAX];
} Errors;

static void on_error(j_common_ptr cinfo) {
    Errors *e = (Errors *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, e->message);
    longjmp(e->escape, 1);
}

/* Corrupt-data warnings (level -1) are errors, as for a strict decoder; trace messages are ignored. */
static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) on_error(cinfo);
}

static void on_output(j_common_ptr cinfo) { (void)cinfo; }

static int short_skip = 0, stalled_read = 0; /* tests: skip_rows and read_rows make less progress */

/* jpeg_skip_scanlines; with short_skip on, one row short (as a source that ran dry would). */
static JDIMENSION skip_rows(j_decompress_ptr cinfo, JDIMENSION n) {
    if (short_skip) return n > 1 ? jpeg_skip_scanlines(cinfo, n - 1) : 0;
    return jpeg_skip_scanlines(cinfo, n);
}

/* jpeg_read_scanlines; with stalled_read on, no row (as a suspending source would). */
static JDIMENSION read_rows(j_decompress_ptr cinfo, JSAMPARRAY rows, JDIMENSION n) {
    if (stalled_read) return 0;
    return jpeg_read_scanlines(cinfo, rows, n);
}

/* Whether the data ends with the end-of-image marker: libjpeg decodes the rows above a truncation
 * without complaint, so a cropped decode of a truncated file could succeed where the full decode
 * refuses it; such files (and those with bytes after the marker) take the full decode. */
static int ends_with_eoi(const uint8_t *data, size_t size) {
    return size >= 2 && data[size - 2] == 0xFF && data[size - 1] == 0xD9;
}

typedef struct {
    const uint8_t *data;
    size_t size;
    int denom;            /* DCT scale 1/denom */
    int want_h, want_w;   /* the scaled size the caller computed its box for */
    float box[4];
    int out_h, out_w;
    int flip;             /* mirror the output left-right */
    uint8_t *out;
    /* results */
    char message[JMSG_LENGTH_MAX];
    int decoded_rows, decoded_cols;
} Job;

/* Decode the region the plan reads (plus MARGIN) and resize it into job->out. 0 on success. */
static int run_job(Job *job) {
    struct jpeg_decompress_struct cinfo;
    Errors err;
    Plan plan;
    uint8_t *volatile pixels = NULL;
    JSAMPROW *volatile rows = NULL;
    volatile int planned = 0;
    volatile int status = -1;

    memset(&plan, 0, sizeof(plan));
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    err.pub.output_message = on_output;
    err.message[0] = '\0';
    if (setjmp(err.escape)) {
        snprintf(job->message, sizeof(job->message), "%s", err.message);
        goto done;
    }
    jpeg_create_decompress(&cinfo);
    if (!ends_with_eoi(job->data, job->size)) {
        snprintf(job->message, sizeof(job->message), "no end-of-image marker at the end of the data (truncated?)");
        goto done;
    }
    jpeg_mem_src(&cinfo, (unsigned char *)job->data, (unsigned long)job->size);
    jpeg_read_header(&cinfo, TRUE);
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)job->denom;
    cinfo.out_color_space = JCS_RGB;
    cinfo.dct_method = JDCT_ISLOW;
    cinfo.do_fancy_upsampling = TRUE;
    jpeg_calc_output_dimensions(&cinfo);
    if ((int)cinfo.output_height != job->want_h || (int)cinfo.output_width != job->want_w) {
        snprintf(job->message, sizeof(job->message), "scaled size %ux%u, expected %dx%d",
                 cinfo.output_width, cinfo.output_height, job->want_w, job->want_h);
        goto done;
    }
    if (plan_build(&plan, job->want_h, job->want_w, job->box, job->out_h, job->out_w)) {
        snprintf(job->message, sizeof(job->message), "out of memory");
        goto done;
    }
    planned = 1;
    jpeg_start_decompress(&cinfo);
    {
        int full_w = (int)cinfo.output_width;
        int y0 = plan.row_lo - MARGIN < 0 ? 0 : plan.row_lo - MARGIN;
        int y1 = plan.row_hi;
        int want_lo = plan.col_lo - MARGIN < 0 ? 0 : plan.col_lo - MARGIN;
        int want_hi = plan.col_hi + MARGIN > full_w ? full_w : plan.col_hi + MARGIN;
        JDIMENSION x0 = (JDIMENSION)want_lo, width = (JDIMENSION)(want_hi - want_lo);
        View src;
        int r;

        if (want_lo > 0 || want_hi < full_w) jpeg_crop_scanline(&cinfo, &x0, &width);
        /* The rows below are indexed from y0: a short skip would put them before the buffer. */
        if (y0 > 0 && (skip_rows(&cinfo, (JDIMENSION)y0) != (JDIMENSION)y0 || (int)cinfo.output_scanline != y0)) {
            snprintf(job->message, sizeof(job->message), "jpeg_skip_scanlines stopped at row %u of %d",
                     cinfo.output_scanline, y0);
            goto done;
        }
        pixels = malloc((size_t)(y1 - y0) * (size_t)cinfo.output_width * 3 + PAD);
        rows = malloc(sizeof(JSAMPROW) * (size_t)(y1 - y0));
        if (!pixels || !rows) {
            snprintf(job->message, sizeof(job->message), "out of memory");
            goto done;
        }
        for (r = 0; r < y1 - y0; r++) rows[r] = pixels + (size_t)r * cinfo.output_width * 3;
        while ((int)cinfo.output_scanline < y1) { /* each call must return a row, or this would spin */
            JDIMENSION at = cinfo.output_scanline;
            if (read_rows(&cinfo, rows + (at - (JDIMENSION)y0), (JDIMENSION)y1 - at) == 0) {
                snprintf(job->message, sizeof(job->message), "jpeg_read_scanlines returned no row at row %u of %d",
                         cinfo.output_scanline, y1);
                goto done;
            }
        }
        /* Down to the last row: read on to the end-of-image marker, as the full decode does, so data
         * left over after the last row (a warning, hence an error here) is refused on both paths. */
        if (y1 == (int)cinfo.output_height) jpeg_finish_decompress(&cinfo);
        job->decoded_rows = y1 - y0;
        job->decoded_cols = (int)cinfo.output_width;
        src.data = pixels;
        src.stride = (ptrdiff_t)cinfo.output_width * 3;
        src.y0 = y0;
        src.x0 = (int)x0;
        if (plan_run(&plan, &src, job->out_h, job->out_w, job->out)) {
            snprintf(job->message, sizeof(job->message), "out of memory");
            goto done;
        }
        if (job->flip) mirror_rows(job->out, job->out_h, job->out_w);
    }
    status = 0;
done:
    jpeg_destroy_decompress(&cinfo);
    if (planned) plan_free(&plan);
    free(pixels);
    free(rows);
    return status;
}

/* ---------------------------------------------------------------- Python bindings */

/* A (height, width) argument: both >= 1 (zero or negative sizes would reach the kernels' arithmetic). */
static int check_size(const char *name, int h, int w) {
    if (h < 1 || w < 1) {
        PyErr_Format(PyExc_ValueError, "%s must be >= 1 on both sides, got (%d, %d)", name, h, w);
        return -1;
    }
    return 0;
}

/* The buffer `name` must hold an (h, w, 3) uint8 image (sizes checked >= 1: the product cannot wrap). */
static int check_buffer(const char *name, const Py_buffer *buf, int h, int w) {
    if ((size_t)buf->len != (size_t)h * (size_t)w * 3) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, expected %d x %d x 3", name, buf->len, h, w);
        return -1;
    }
    return 0;
}

/* The box must be finite (every comparison with NaN is false, and converting NaN or infinity to
 * int is undefined) and inside the (full_h, full_w) image with x1 >= x0, y1 >= y0. */
static int check_box(const float box[4], int full_h, int full_w) {
    char text[160];
    if (!isfinite(box[0]) || !isfinite(box[1]) || !isfinite(box[2]) || !isfinite(box[3])) {
        snprintf(text, sizeof(text), "box must be finite, got (%g, %g, %g, %g)", box[0], box[1], box[2], box[3]);
        PyErr_SetString(PyExc_ValueError, text);
        return -1;
    }
    if (box[0] < 0 || box[1] < 0 || box[2] > full_w || box[3] > full_h || box[2] - box[0] < 0 ||
        box[3] - box[1] < 0) {
        snprintf(text, sizeof(text), "box (%g, %g, %g, %g) is not inside the %d x %d image", box[0], box[1], box[2],
                 box[3], full_w, full_h);
        PyErr_SetString(PyExc_ValueError, text);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(decode_crop_resize_doc,
             "decode_crop_resize(data, denom, scaled_hw, box, out_hw, out, flip=False) -> (decoded_rows, decoded_cols)\n\n"
             "Decode the JPEG `data` at DCT scale 1/denom (its size must be `scaled_hw`), only the region the\n"
             "resize reads, and write Image.resize(out_hw[::-1], BILINEAR, box=box) of it, mirrored left-right\n"
             "if `flip`, into the uint8 buffer `out` of shape out_hw + (3,). Raises ValueError, naming the\n"
             "argument, for a bad one (sizes < 1, a box not finite or not inside, a buffer of the wrong size),\n"
             "and ValueError starting 'libjpeg: ' when it cannot decode the data.");

static PyObject *decode_crop_resize(PyObject *self, PyObject *args) {
    Py_buffer data, out;
    Job job;
    int status;
    PyObject *result = NULL; /* stays NULL on every error path */
    (void)self;
    memset(&job, 0, sizeof(job));
    if (!PyArg_ParseTuple(args, "y*i(ii)(ffff)(ii)w*|p", &data, &job.denom, &job.want_h, &job.want_w, &job.box[0],
                          &job.box[1], &job.box[2], &job.box[3], &job.out_h, &job.out_w, &out, &job.flip))
        return NULL;
    if (job.denom != 1 && job.denom != 2 && job.denom != 4 && job.denom != 8) {
        PyErr_Format(PyExc_ValueError, "denom must be 1, 2, 4 or 8, got %d", job.denom);
        goto done;
    }
    if (check_size("scaled_hw", job.want_h, job.want_w) || check_size("out_hw", job.out_h, job.out_w) ||
        check_buffer("out", &out, job.out_h, job.out_w) || check_box(job.box, job.want_h, job.want_w))
        goto done;
    job.data = data.buf;
    job.size = (size_t)data.len;
    job.out = out.buf;
    Py_BEGIN_ALLOW_THREADS
    status = run_job(&job);
    Py_END_ALLOW_THREADS
    if (status)
        PyErr_Format(PyExc_ValueError, "libjpeg: %s", job.message);
    else
        result = Py_BuildValue("(ii)", job.decoded_rows, job.decoded_cols);
done:
    PyBuffer_Release(&data);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(resize_doc,
             "resize(image, hw, box, out_hw, out)\n\n"
             "Image.resize(out.shape[1::-1], BILINEAR, box=box) of the C-contiguous uint8 RGB `image` of shape\n"
             "`hw` + (3,), written into `out`: the resampler of decode_crop_resize on its own (for tests).");

static PyObject *resize(PyObject *self, PyObject *args) {
    Py_buffer image, out;
    int full_h, full_w, out_h, out_w, status = -1;
    float box[4];
    Plan plan;
    View src;
    uint8_t *padded = NULL;
    PyObject *result = NULL; /* stays NULL on every error path */
    (void)self;
    if (!PyArg_ParseTuple(args, "y*(ii)(ffff)(ii)w*", &image, &full_h, &full_w, &box[0], &box[1], &box[2], &box[3],
                          &out_h, &out_w, &out))
        return NULL;
    if (check_size("hw", full_h, full_w) || check_buffer("image", &image, full_h, full_w) ||
        check_size("out_hw", out_h, out_w) || check_buffer("out", &out, out_h, out_w) || check_box(box, full_h, full_w))
        goto done;
    if (plan_build(&plan, full_h, full_w, box, out_h, out_w)) {
        PyErr_NoMemory();
        goto done;
    }
    padded = malloc((size_t)image.len + PAD); /* the source buffers' spare bytes */
    if (!padded) {
        plan_free(&plan);
        PyErr_NoMemory();
        goto done;
    }
    memcpy(padded, image.buf, (size_t)image.len);
    src.data = padded;
    src.stride = (ptrdiff_t)full_w * 3;
    src.y0 = 0;
    src.x0 = 0;
    Py_BEGIN_ALLOW_THREADS
    status = plan_run(&plan, &src, out_h, out_w, out.buf);
    Py_END_ALLOW_THREADS
    plan_free(&plan);
    free(padded);
    if (status) {
        PyErr_NoMemory();
    } else {
        Py_INCREF(Py_None);
        result = Py_None;
    }
done:
    PyBuffer_Release(&image);
    PyBuffer_Release(&out);
    return result;
}

PyDoc_STRVAR(set_avx2_doc,
             "set_avx2(allowed) -> bool\n\n"
             "Whether the horizontal pass may use AVX2 where the CPU has it (default True); returns whether\n"
             "it is used now. For tests: both loops must give the same bytes.");

static PyObject *set_avx2(PyObject *self, PyObject *arg) {
    int on = PyObject_IsTrue(arg);
    (void)self;
    if (on < 0) return NULL;
    allow_avx2 = on;
#if defined(__x86_64__) && defined(__GNUC__)
    return PyBool_FromLong(allow_avx2 && __builtin_cpu_supports("avx2"));
#else
    Py_RETURN_FALSE;
#endif
}

PyDoc_STRVAR(set_short_reads_doc,
             "set_short_reads(skip, read) -> None\n\n"
             "For tests: with `skip`, libjpeg's skip call stops one row short; with `read`, its read call\n"
             "returns no row (as with a data source that ran dry); decode_crop_resize must raise ValueError,\n"
             "not store rows before its buffer or loop forever. Both off by default.");

static PyObject *set_short_reads(PyObject *self, PyObject *args) {
    int skip, read;
    (void)self;
    if (!PyArg_ParseTuple(args, "pp", &skip, &read)) return NULL;
    short_skip = skip;
    stalled_read = read;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"set_avx2", set_avx2, METH_O, set_avx2_doc},
    {"set_short_reads", set_short_reads, METH_VARARGS, set_short_reads_doc},
    {"decode_crop_resize", decode_crop_resize, METH_VARARGS, decode_crop_resize_doc},
    {"resize", resize, METH_VARARGS, resize_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_jpeg_crop",
    .m_doc = "Cropped DCT-scaled JPEG decode + Pillow-identical bilinear resize (see qkd_jax/data/jpeg_augment.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__jpeg_crop(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "LIBJPEG_VERSION", JPEG_LIB_VERSION)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
