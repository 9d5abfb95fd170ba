// A stress of engines/cpu_team.h for tests/test_native.py: random jobs, posted jobs, joins and resizes
// from one caller, each piece counted. Exits 0 when every job's pieces ran exactly once, else 1; a
// lost wake-up or a miscounted job hangs (the test's timeout catches it).
#include <cstdio>
#include <cstdlib>

#include "cpu_team.h"

int main(int argc, char** argv) {
    gpunn::Team& team = gpunn::team();
    team.resize(2);
    std::atomic<long> ran{0};
    long expected = 0;
    unsigned seed = 1;
    auto busy = [&](int most) {
        for (volatile int s = 0; s < rand_r(&seed) % most; ++s) {
        }
    };
    for (long i = 0; i < atol(argv[1]); ++i) {
        const int r = rand_r(&seed) % 100;
        if (r < 60) {
            int counts[gpunn::Team::MOST] = {0};
            auto piece = [&](int p, int) {
                counts[p]++;
                ran++;
                busy(r % 2 ? 2000 : 2);
            };
            team.run(piece);
            expected += team.width();
            for (int p = 0; p < team.width(); ++p) {
                if (counts[p] != 1) {
                    std::printf("job %ld: piece %d ran %d times\n", i, p, counts[p]);
                    return 1;
                }
            }
        } else if (r < 90) {
            team.post([&] {
                ran++;
                busy(r % 2 ? 3000 : 2);
            });
            expected += 1;
            if (r % 3 == 0) busy(5000);  // else the caller joins at once, often before a worker claims
            if (r < 75) team.join();
        } else if (r < 95) {
            team.resize(1 + rand_r(&seed) % 3);
        } else {
            busy(300000);  // the workers fall asleep
        }
    }
    team.join();
    std::printf("%ld pieces ran of %ld\n", ran.load(), expected);
    return ran.load() == expected ? 0 : 1;
}
