//go:build tools

// Package daprd pins github.com/dapr/dapr so that the set-up script can build the real
// daprd (cmd/daprd) from its Go module. No dapr source is kept here: go.mod and go.sum
// pin every module by hash.
package daprd

import _ "github.com/dapr/dapr/cmd/daprd"
