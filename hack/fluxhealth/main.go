// fluxhealth prints what Flux's kustomize-controller says of each object it reads, given the
// healthCheckExprs a Kustomization declares for it: the evaluator of github.com/fluxcd/pkg/
// runtime/cel (RFC 0009), the code kustomize-controller runs. Usage:
//
//	fluxhealth EXPRS.yaml < objects
//
// EXPRS.yaml is a Kustomization (or a list of them, or a file of several documents); the
// entries of spec.healthCheckExprs are matched by apiVersion and kind ("" matches any kind).
// Objects come as one JSON object, a List or a JSON array on stdin; one line per object on
// stdout: kind, namespace/name, status (Unknown when an expression cannot be evaluated, as
// Flux's status reader says) and that error, separated by tabs. Built by `hack/go-tool.sh fluxhealth`.
package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/fluxcd/pkg/apis/kustomize"
	"github.com/fluxcd/pkg/runtime/cel"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"sigs.k8s.io/yaml"
)

type kustomization struct {
	Spec struct {
		HealthCheckExprs []kustomize.CustomHealthCheck `json:"healthCheckExprs"`
	} `json:"spec"`
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(2)
}

func main() {
	if len(os.Args) != 2 {
		fail("usage: fluxhealth EXPRS.yaml < objects")
	}
	text, err := os.ReadFile(os.Args[1])
	if err != nil {
		fail("reading %s: %v", os.Args[1], err)
	}
	var checks []kustomize.CustomHealthCheck
	for _, document := range strings.Split(string(text), "\n---") {
		if strings.TrimSpace(document) == "" {
			continue
		}
		var k kustomization
		if err := yaml.Unmarshal([]byte(document), &k); err != nil {
			fail("%s: %v", os.Args[1], err)
		}
		checks = append(checks, k.Spec.HealthCheckExprs...)
	}
	if len(checks) == 0 {
		fail("%s declares no spec.healthCheckExprs", os.Args[1])
	}

	data, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail("reading stdin: %v", err)
	}
	// utiljson keeps integers as int64, as the API machinery does.
	var document any
	if err := utiljson.Unmarshal(data, &document); err != nil {
		fail("parsing stdin: %v", err)
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
		fail("stdin holds no object")
	}
	for _, item := range items {
		object, ok := item.(map[string]any)
		if !ok {
			fail("an item is not an object")
		}
		u := &unstructured.Unstructured{Object: object}
		var check *kustomize.CustomHealthCheck
		for i := range checks {
			c := &checks[i]
			if c.APIVersion == u.GetAPIVersion() && (c.Kind == "" || c.Kind == u.GetKind()) {
				check = c
				break
			}
		}
		if check == nil {
			fail("%s %s/%s: no healthCheckExprs entry for %s", u.GetKind(), u.GetNamespace(), u.GetName(), u.GetAPIVersion())
		}
		evaluator, err := cel.NewStatusEvaluator(&check.HealthCheckExpressions)
		if err != nil {
			fail("%s: %v", check.APIVersion, err)
		}
		// An expression that cannot be evaluated (an object without status: no such
		// attribute) is what kstatus' generic status reader reports as Unknown; Flux polls it
		// again until the health check times out.
		status, message := "Unknown", ""
		if result, err := evaluator.Evaluate(context.Background(), u); err != nil {
			message = err.Error()
		} else {
			status = string(result.Status)
		}
		fmt.Printf("%s\t%s/%s\t%s\t%s\n", u.GetKind(), u.GetNamespace(), u.GetName(), status, message)
	}
}
