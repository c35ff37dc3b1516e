/* A shared library that is not an mxn backend: it lacks mxn_backend_get_api. */
int mxn_test_not_a_backend(void) { return 1; }
