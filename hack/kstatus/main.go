// kstatus prints what sigs.k8s.io/cli-utils' kstatus (the health computation of Flux, Helm 4's
// --wait and kpt) says of each object it reads: one object, a List or a JSON array on stdin, one
// line per object on stdout: kind, namespace/name, status, message, separated by tabs.
//
// The operator's tests run it on live objects to check that GitOps tools read them as a person
// would. Built by `hack/go-tool.sh kstatus`.
package main

import (
	"fmt"
	"io"
	"os"
	"strings"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fmt.Fprintln(os.Stderr, "reading stdin:", err)
		os.Exit(2)
	}
	// utiljson keeps integers as int64: kstatus reads generations with NestedInt64, and the
	// float64 of encoding/json would make it fail.
	var document any
	if err := utiljson.Unmarshal(data, &document); err != nil {
		fmt.Fprintln(os.Stderr, "parsing stdin:", err)
		os.Exit(2)
	}
	var items []any
	switch v := document.(type) {
	case []any:
		items = v
	case map[string]any:
		if kind, _ := v["kind"].(string); strings.HasSuffix(kind, "List") {
			items, _ = v["items"].([]any)
		} else {
			items = []any{v}
		}
	default:
		fmt.Fprintln(os.Stderr, "stdin holds no object")
		os.Exit(2)
	}
	for _, item := range items {
		object, ok := item.(map[string]any)
		if !ok {
			fmt.Fprintln(os.Stderr, "an item is not an object")
			os.Exit(2)
		}
		u := &unstructured.Unstructured{Object: object}
		result, err := status.Compute(u)
		if err != nil {
			fmt.Fprintf(os.Stderr, "%s %s/%s: %v\n", u.GetKind(), u.GetNamespace(), u.GetName(), err)
			os.Exit(2)
		}
		fmt.Printf("%s\t%s/%s\t%s\t%s\n", u.GetKind(), u.GetNamespace(), u.GetName(), result.Status, result.Message)
	}
}
