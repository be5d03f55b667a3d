/*
 * Expert heat files (engine/heat.c): a written file reads back the same;
 * every kind of bad input is refused naming the line and what is wrong,
 * leaving the heat zero.
 */
#include "heat.h"
#include "tests.h"

#include <errno.h>
#include <unistd.h>

static void check_bad(const char *text, const char *want)
{
    double heat[12];
    struct moe_error err;

    for (int i = 0; i < 12; i++)
        heat[i] = 1.0;
    ASSERT_EQ(moe_heat_parse(text, strlen(text), "h", 3, 4, heat, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, want);
    for (int i = 0; i < 12; i++)
        ASSERT_TRUE(heat[i] == 0.0);
}

int main(void)
{
    char dir[] = "/tmp/moed-heat-XXXXXX", path[256];
    double heat[12], back[15]; /* back: room for the 3 x 5 shape too */
    struct moe_error err;

    ASSERT_TRUE(mkdtemp(dir) != NULL);
    snprintf(path, sizeof(path), "%s/m.heat", dir);
    ASSERT_EQ(moe_heat_read(path, 3, 4, back, &err), -ENOENT);
    for (int i = 0; i < 12; i++)
        heat[i] = i % 3 ? 0.0 : 1.5 * i + 0.25;
    heat[11] = 123456.5;
    ASSERT_EQ(moe_heat_write(path, 3, 4, heat, &err), 0);
    ASSERT_EQ(moe_heat_read(path, 3, 4, back, &err), 0);
    for (int i = 0; i < 12; i++)
        ASSERT_NEAR(back[i], heat[i], 1e-6 * (1 + heat[i]));
    /* another shape: refused saying both */
    ASSERT_EQ(moe_heat_read(path, 3, 5, back, &err), -EINVAL);
    ASSERT_CONTAINS(err.msg, "3 layers and 4 experts; this one has 3 and 5");
    ASSERT_CONTAINS(err.msg, path);
    unlink(path);
    rmdir(dir);

    /* comments and blank lines anywhere; CRLF tolerated after numbers */
    const char *ok = "# c\n\nmoed-heat 1 3 4\n# x\n2 3 7\r\n0 0 1e3\n";
    ASSERT_EQ(moe_heat_parse(ok, strlen(ok), "h", 3, 4, back, &err), 0);
    ASSERT_NEAR(back[11], 7.0, 0);
    ASSERT_NEAR(back[0], 1000.0, 0);

    check_bad("", "empty");
    check_bad("# only a comment\n", "empty");
    check_bad("moed-heat 2 3 4\n", "version 2");
    check_bad("moed-heat 1 3\n", "header must be");
    check_bad("moed-heat 1 3 4 5\n", "header must be");
    check_bad("hello\n", "h:1: not a heat file");
    check_bad("moed-heat 1 3 4\n0 0\n", "h:2: expected");
    check_bad("moed-heat 1 3 4\n0 0 nan\n", "h:2: expected");
    check_bad("moed-heat 1 3 4\n0 0 inf\n", "h:2: expected");
    check_bad("moed-heat 1 3 4\n0 0 -1\n", "h:2: expected");
    check_bad("moed-heat 1 3 4\n0 0 1e999\n", "h:2: expected");
    check_bad("moed-heat 1 3 4\n0 0 0x10\n", "h:2: expected");
    check_bad("moed-heat 1 3 4\n-1 0 1\n", "h:2: expected");
    check_bad("moed-heat 1 3 4\n0 0 1 2\n", "h:2: expected");
    check_bad("moed-heat 1 3 4\n3 0 1\n", "h:2: layer 3 expert 0 is outside");
    check_bad("moed-heat 1 3 4\n0 4 1\n", "outside the model");
    check_bad("moed-heat 1 3 4\n99999999999 0 1\n", "h:2: expected");
    check_bad("moed-heat 1 3 4\n1 1 1\n1 1 2\n", "h:3: layer 1 expert 1 is named twice");
    check_bad("moed-heat 1 3 4\n1 1\0 1\n", "h:2:");
    {
        const char nul[] = "moed-heat 1 3 4\n1 1 \0\n";

        ASSERT_EQ(moe_heat_parse(nul, sizeof(nul) - 1, "h", 3, 4, back, &err), -EINVAL);
        ASSERT_CONTAINS(err.msg, "NUL");
    }
    printf("ok\n");
    return 0;
}
