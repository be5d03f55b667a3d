/*
 * Tests of moed's configuration (daemon/config.c): errors name the file's
 * line, also after comments, blank lines and a syntax error; moed
 * --check-config collects every error of a file (unknown keys, bad values,
 * lines that are not INI, settings that go together, unreadable TLS files,
 * model directories that are not checkpoints) rather than the first, and
 * says nothing about a good one.
 */
#include "config.h"
#include "tests.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char tmpdir[] = "/tmp/test-moed-config-XXXXXX";

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");

    ASSERT_TRUE(f != NULL);
    fputs(text, f);
    fclose(f);
}

/* The first error, with the right line, from moed_config_parse. */
static void test_first_error_line(void)
{
    static const struct {
        const char *text, *needle;
    } cases[] = {
        {"[cache]\npolicy = mru\n", "t.conf:2: cache: policy = 'mru': expected lru"},
        {"; comment\n\n[server]\n# another\nlog_level = loud\n", "t.conf:5:"},
        {"[cache]\nhost_cach_bytes = 1G\n", "t.conf:2: unknown key 'host_cach_bytes'"},
        {"[server]\nthis is not ini\npolicy = lru\n", "t.conf:2: not an INI line"},
        {"[server]\npolicy = lru\nnot ini\n", "t.conf:2: key 'policy' belongs in section [cache]"},
        {"[cache]\nprefetch = true\n  continued\n", "t.conf:3: cache: prefetch"},
    };

    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct moed_config c;
        struct moe_error err = {0};

        moed_config_init(&c);
        ASSERT_EQ(moed_config_parse(&c, cases[i].text, "t.conf", &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, cases[i].needle);
        moed_config_clear(&c);
    }
}

/* A line longer than inih's buffer is refused (its value would be cut), and
 * the lines after it keep their numbers. */
static void test_long_line(void)
{
    char text[1024], path[256];
    struct moed_config c;
    struct moed_config_check k;
    struct moe_error err = {0};

    snprintf(text, sizeof(text), "[server]\ntoken = %0500d\n[cache]\npolicy = x\n", 7);
    moed_config_init(&c);
    ASSERT_TRUE(moed_config_parse(&c, text, "t.conf", &err) < 0);
    ASSERT_CONTAINS(err.msg, "t.conf:2: line longer than");
    moed_config_clear(&c);
    snprintf(path, sizeof(path), "%s/long.conf", tmpdir);
    write_text(path, text);
    ASSERT_EQ(moed_config_check(path, 0, NULL, &k), 2);
    ASSERT_CONTAINS(k.errors[1], "long.conf:4: cache: policy = 'x'");
    moed_config_check_clear(&k);
}

static void test_check_good(void)
{
    char path[256];
    struct moed_config_check k;
    char *argv[] = {"--listen", "127.0.0.1:0"};

    snprintf(path, sizeof(path), "%s/good.conf", tmpdir);
    write_text(path, "[server]\nlog_level = debug\n[cache]\npolicy = lru\n");
    ASSERT_EQ(moed_config_check(path, 2, argv, &k), 0);
    ASSERT_EQ(k.n, 0);
    moed_config_check_clear(&k);
}

static void test_check_every_error(void)
{
    char path[256], text[1024];
    struct moed_config_check k;
    static const char *const want[] = {
        "bad.conf:2: unknown key 'host_cach_bytes'",
        "bad.conf:3: cache: policy = 'mru': expected lru, freq, routing or adaptive",
        "bad.conf:5: server: rpc_threads = '0': expected an integer from 1 to 64",
        "bad.conf:6: [server] tls_cert = '/nonexistent/cert.pem': cannot read it",
        "bad.conf:9: [models] gone = /nonexistent/model:",
        "bad.conf:8: not an INI line",
        "tls_cert and tls_key go together",
        "--model flagged=/nonexistent/flagged:",
    };
    char *argv[] = {"--model", "flagged=/nonexistent/flagged"};

    snprintf(path, sizeof(path), "%s/bad.conf", tmpdir);
    snprintf(text, sizeof(text),
             "[cache]\nhost_cach_bytes = 1G\npolicy = mru\n[server]\nrpc_threads = 0\n"
             "tls_cert = /nonexistent/cert.pem\n[models]\nnot ini\ngone = /nonexistent/model\n");
    write_text(path, text);
    ASSERT_EQ(moed_config_check(path, 2, argv, &k), (int)(sizeof(want) / sizeof(want[0])));
    for (size_t i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        bool found = false;

        for (int j = 0; j < k.n; j++)
            found = found || strstr(k.errors[j], want[i]);
        if (!found) {
            for (int j = 0; j < k.n; j++)
                fprintf(stderr, "  got: %s\n", k.errors[j]);
            FAIL("no error '%s'", want[i]);
        }
    }
    moed_config_check_clear(&k);
}

static void test_check_missing_file(void)
{
    struct moed_config_check k;

    ASSERT_EQ(moed_config_check("/nonexistent/moed.conf", 0, NULL, &k), 1);
    ASSERT_CONTAINS(k.errors[0], "/nonexistent/moed.conf");
    moed_config_check_clear(&k);
}

/* More errors than the cap are counted, not kept. */
static void test_check_cap(void)
{
    char path[256];
    struct moed_config_check k;
    FILE *f;

    snprintf(path, sizeof(path), "%s/many.conf", tmpdir);
    f = fopen(path, "w");
    ASSERT_TRUE(f != NULL);
    fputs("[cache]\n", f);
    for (int i = 0; i < MOED_CHECK_MAX_ERRORS + 10; i++)
        fprintf(f, "nope%d = 1\n", i);
    fclose(f);
    ASSERT_EQ(moed_config_check(path, 0, NULL, &k), MOED_CHECK_MAX_ERRORS + 10);
    ASSERT_EQ(k.n, MOED_CHECK_MAX_ERRORS);
    ASSERT_EQ(k.dropped, 10);
    moed_config_check_clear(&k);
}

/* [compute] int8_activations: off by default, a boolean, refused otherwise. */
static void test_int8_activations(void)
{
    struct moed_config c;
    struct moe_error err = {0};

    moed_config_init(&c);
    ASSERT_TRUE(!c.int8_activations);
    ASSERT_EQ(moed_config_parse(&c, "[compute]\nint8_activations = true\n", "t.conf", &err), 0);
    ASSERT_TRUE(c.int8_activations);
    ASSERT_EQ(moed_config_parse(&c, "[compute]\nint8_activations = maybe\n", "t.conf", &err),
              -EINVAL);
    ASSERT_CONTAINS(err.msg, "t.conf:2: compute: int8_activations");
    moed_config_clear(&c);
}

int main(void)
{
    char cmd[128];

    ASSERT_TRUE(mkdtemp(tmpdir) != NULL);
    test_first_error_line();
    test_long_line();
    test_check_good();
    test_check_every_error();
    test_check_missing_file();
    test_check_cap();
    test_int8_activations();
    snprintf(cmd, sizeof(cmd), "rm -rf %s", tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
    return 0;
}
