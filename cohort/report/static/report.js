(function(){
function key(td){var v=td.dataset.v!==undefined?td.dataset.v:td.textContent.trim();
var n=v===''?NaN:Number(v);return isNaN(n)?[1,v.toLowerCase()]:[0,n];}
document.querySelectorAll('table.sortable').forEach(function(table){
table.querySelectorAll('th').forEach(function(th){th.addEventListener('click',function(){
var i=th.cellIndex,asc=th.dataset.dir!=='asc',body=table.tBodies[0];
table.querySelectorAll('th').forEach(function(h){delete h.dataset.dir;});
th.dataset.dir=asc?'asc':'desc';
var rows=Array.prototype.slice.call(body.rows);
rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);
if(x[0]!==y[0])return x[0]-y[0];var c=x[1]<y[1]?-1:x[1]>y[1]?1:0;return asc?c:-c;});
rows.forEach(function(r){body.appendChild(r);});});});});
window.addEventListener('load',function(){var imgs=Array.prototype.slice.call(document.images);
var ok=imgs.filter(function(i){return i.complete&&i.naturalWidth>0;}).length;
document.body.dataset.imagesTotal=imgs.length;document.body.dataset.imagesLoaded=ok;
document.body.dataset.pageErrors=window.cohortErrors.length;
document.body.dataset.errorText=window.cohortErrors.join(' | ');
document.body.dataset.ready='1';});
})();
