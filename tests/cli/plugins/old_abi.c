/* A backend built against a future chip-contract ABI: mxn must refuse it with a reason. */
#include "mxn/backend_abi.h"

static const mxn_backend_api api = {sizeof(mxn_backend_api), MXN_ABI_VERSION + 41, "old_abi"};
const mxn_backend_api* mxn_backend_get_api(void) { return &api; }
