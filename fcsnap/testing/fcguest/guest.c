/*
 * fcguest: a tiny x86-64 guest for testing memory restores under the real Firecracker.
 *
 * Firecracker enters it like a 64-bit Linux kernel: long mode, CPL0, the first 1 GiB
 * identity-mapped, interrupts off, RSI = the zero page (boot_params). It reads its parameters
 * from the kernel command line and fills `fill` pages scattered over its memory above 32 MiB
 * (the k-th at FILL_BASE + (k * stride mod span) pages, stride about 5/8 of the span). Each
 * page is one of 64 template pages (dense random data, a repeating pattern, half zero, nearly
 * empty) chosen by the page's number and version, its first two words a tag of both; every
 * page's version and tag are kept in guest RAM. Then, round after round, it reads the first
 * word of each of the first `ws` pages of its fill order (its working set: the same pages
 * every round) and checks it is the page's tag, compares `sweep` more pages word for word
 * (in turn, so that every filled page is compared once every fill/sweep rounds), rewrites
 * `write` pages chosen at random at their next version, counts the round in RAM and prints
 * on COM1:
 *
 *     fcguest round N ok
 *     fcguest round N BAD page=0x...       (the first page that did not hold what it should)
 *
 * A restore that serves a wrong or missing page of the working set shows as BAD in the next
 * round, a damaged byte anywhere within fill/sweep rounds; one that loses the guest's state
 * shows as a counter that does not go on. Command line (decimal; other words
 * are ignored, as Firecracker adds its own): fill=PAGES ws=PAGES sweep=PAGES write=PAGES
 * seed=N. Bad parameters print `fcguest error ...` and halt.
 *
 * Why it is written so: under kvm_pvm (no hardware virtualization) CPL0 code runs through
 * KVM's instruction emulator at about a million instructions a second, so pages are copied
 * and compared with `rep movsq` / `repe cmpsq` (far cheaper there than a loop), and
 * only general-purpose registers are used (the emulator does not do every SSE instruction).
 */

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define PAGE 4096UL
#define FILL_BASE (32UL << 20)   /* pages are filled from here up */
#define MAP_END (1UL << 30)      /* what Firecracker identity-maps */
#define MAX_PAGES ((MAP_END - FILL_BASE) / PAGE)
#define COM1 0x3f8
#define WORDS (PAGE / 8)

/* boot_params (the zero page) offsets, as Linux's boot protocol defines them */
#define BP_E820_ENTRIES 0x1e8
#define BP_CMD_LINE_PTR 0x228
#define BP_E820_TABLE 0x2d0

struct params {
    u64 fill, ws, sweep, write, seed;
};

/* Everything that must survive a snapshot lives here, in guest RAM. */
static struct state {
    struct params p;
    u64 span;          /* pages between FILL_BASE and the end of usable memory */
    u64 stride;        /* fill order: page k is (k * stride) mod span, stride coprime to span */
    u64 round;
    u64 sweep_cursor;
    u64 rng;
    u64 version[MAX_PAGES];  /* of each filled page, by fill order */
    u64 tag[MAX_PAGES];      /* its first word */
} st;

#define TEMPLATES 64
static u64 templates[TEMPLATES][WORDS] __attribute__((aligned(4096)));

u8 stack[65536] __attribute__((aligned(16)));

__asm__(
    ".section .text.entry,\"ax\"\n"
    ".globl _start\n"
    "_start:\n"
    "    lea stack+65536(%rip), %rsp\n"
    "    mov %rsi, %rdi\n"
    "    call guest_main\n"
    "1:  hlt\n"
    "    jmp 1b\n"
    ".text\n");

static inline void outb(u16 port, u8 value)
{
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static void puts_serial(const char *s)
{
    while (*s)
        outb(COM1, (u8)*s++);
}

static void put_dec(u64 v)
{
    char buf[24];
    int i = 23;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts_serial(buf + i);
}

static void put_hex(u64 v)
{
    char buf[19];
    int i = 18;
    buf[i] = 0;
    do {
        buf[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    puts_serial(buf + i);
}

static u64 mix(u64 x)  /* splitmix64's finaliser: page seeds and choices */
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9UL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebUL;
    return x ^ (x >> 31);
}

static u64 next_random(void)
{
    st.rng += 0x9e3779b97f4a7c15UL;
    return mix(st.rng);
}

static u64 gcd(u64 a, u64 b)
{
    while (b) {
        u64 t = a % b;
        a = b;
        b = t;
    }
    return a;
}

static volatile u64 *page_at(u64 k)  /* the k-th page of the fill order */
{
    return (volatile u64 *)(FILL_BASE + (k * st.stride % st.span) * PAGE);
}

static void copy_words(volatile u64 *dst, const u64 *src, u64 n)
{
    __asm__ volatile("rep movsq" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
}

static int same_words(volatile const u64 *a, const u64 *b, u64 n)
{
    u8 equal;
    __asm__ volatile("repe cmpsq\n\tsete %0" : "=r"(equal), "+D"(a), "+S"(b), "+c"(n)
                     : : "memory", "cc");
    return equal;
}

/* Template t: one of four kinds, so that a restore meets dense random data, repeating
   patterns, half-zero pages and nearly empty ones. */
static void make_template(u64 t)
{
    u64 *w = templates[t];
    u64 x = mix(st.p.seed * 0x10000 + t);
    for (u64 i = 0; i < WORDS; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        switch (t & 3) {
        case 0: w[i] = x; break;
        case 1: w[i] = t * 0x0101010101010101UL + (i & 7); break;
        case 2: w[i] = i < WORDS / 2 ? x : 0; break;
        default: w[i] = (x & 0xff) == 0 ? x : 0; break;
        }
    }
}

static u64 tag(u64 k, u64 version)
{
    return mix(st.p.seed ^ (k << 24) ^ version);
}

/* Page k at `version`: a template chosen by (k, version), its first two words a tag. */
static void write_page(u64 k, u64 version)
{
    volatile u64 *w = page_at(k);
    u64 t = tag(k, version);
    copy_words(w, templates[t % TEMPLATES], WORDS);
    w[0] = t;
    w[1] = k ^ (version << 32);
    st.version[k] = version;
    st.tag[k] = t;
}

/* Every word of page k as write_page left it. */
static int check_page(u64 k)
{
    volatile u64 *w = page_at(k);
    u64 v = st.version[k], t = st.tag[k];
    return w[0] == t && w[1] == (k ^ (v << 32)) &&
           same_words(w + 2, templates[t % TEMPLATES] + 2, WORDS - 2);
}

/* Read the first word of the first `ws` pages of the fill order: each must be its page's tag
   (a wrong, zero or misplaced page is not). The first such page that is not, or ~0. */
static u64 touch_working_set(void)
{
    u64 bad = ~0UL, at = 0;
    for (u64 k = 0; k < st.p.ws; k++) {
        if (*(volatile u64 *)(FILL_BASE + at * PAGE) != st.tag[k] && bad == ~0UL)
            bad = k;
        at += st.stride;
        if (at >= st.span)
            at -= st.span;
    }
    return bad;
}

static u64 parse_dec(const char *s)
{
    u64 v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (u64)(*s++ - '0');
    return v;
}

static int starts(const char *s, const char *word)
{
    while (*word)
        if (*s++ != *word++)
            return 0;
    return 1;
}

static void parse_cmdline(const char *s)
{
    while (s && *s) {
        while (*s == ' ')
            s++;
        if (starts(s, "fill="))
            st.p.fill = parse_dec(s + 5);
        else if (starts(s, "ws="))
            st.p.ws = parse_dec(s + 3);
        else if (starts(s, "sweep="))
            st.p.sweep = parse_dec(s + 6);
        else if (starts(s, "write="))
            st.p.write = parse_dec(s + 6);
        else if (starts(s, "seed="))
            st.p.seed = parse_dec(s + 5);
        while (*s && *s != ' ')
            s++;
    }
}

/* The end of the usable RAM region that holds FILL_BASE, from the e820 map. */
static u64 memory_end(const u8 *zero_page)
{
    u8 entries = zero_page[BP_E820_ENTRIES];
    const u8 *e = zero_page + BP_E820_TABLE;
    for (u8 i = 0; i < entries && i < 128; i++, e += 20) {
        u64 addr = *(const u64 *)e, size = *(const u64 *)(e + 8);
        u32 type = *(const u32 *)(e + 16);
        if (type == 1 && addr <= FILL_BASE && FILL_BASE < addr + size)
            return addr + size < MAP_END ? addr + size : MAP_END;
    }
    return 0;
}

static void halt(const char *why)
{
    puts_serial("fcguest error ");
    puts_serial(why);
    puts_serial("\n");
    for (;;)
        __asm__ volatile("hlt");
}

void guest_main(const u8 *zero_page);
void guest_main(const u8 *zero_page)
{
    st.p = (struct params){.fill = 2048, .ws = 1024, .sweep = 512, .write = 16, .seed = 1};
    parse_cmdline((const char *)(u64)*(const u32 *)(zero_page + BP_CMD_LINE_PTR));
    u64 end = memory_end(zero_page);
    if (end <= FILL_BASE)
        halt("no usable memory above 32 MiB");
    st.span = (end - FILL_BASE) / PAGE;
    if (st.p.fill == 0 || st.p.fill > st.span)
        halt("fill= must be 1 to the pages above 32 MiB");
    if (st.p.ws > st.p.fill || st.p.sweep > st.p.fill || st.p.write > st.p.fill)
        halt("ws=, sweep= and write= must be at most fill=");
    st.stride = st.span * 5 / 8 + 1;  /* below span: touch_working_set steps by it */
    while (gcd(st.stride, st.span) != 1)
        st.stride++;
    st.rng = mix(st.p.seed + 1);
    puts_serial("fcguest start fill=");
    put_dec(st.p.fill);
    puts_serial(" ws=");
    put_dec(st.p.ws);
    puts_serial(" sweep=");
    put_dec(st.p.sweep);
    puts_serial(" write=");
    put_dec(st.p.write);
    puts_serial(" seed=");
    put_dec(st.p.seed);
    puts_serial(" mem_end=");
    put_hex(end);
    puts_serial("\n");
    for (u64 t = 0; t < TEMPLATES; t++)
        make_template(t);
    for (u64 k = 0; k < st.p.fill; k++)
        write_page(k, 0);
    puts_serial("fcguest filled\n");
    for (;;) {
        u64 bad = touch_working_set();
        for (u64 n = 0; n < st.p.sweep; n++) {
            u64 k = st.sweep_cursor;
            st.sweep_cursor = (k + 1) % st.p.fill;
            if (!check_page(k) && bad == ~0UL)
                bad = k;
        }
        for (u64 n = 0; n < st.p.write; n++) {
            u64 k = next_random() % st.p.fill;
            write_page(k, st.version[k] + 1);
        }
        st.round++;
        puts_serial("fcguest round ");
        put_dec(st.round);
        if (bad != ~0UL) {
            puts_serial(" BAD page=");
            put_hex((u64)page_at(bad));
        } else {
            puts_serial(" ok");
        }
        puts_serial("\n");
    }
}
